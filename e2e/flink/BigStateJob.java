package demo;

import java.io.FileWriter;
import java.io.IOException;
import java.io.Writer;
import java.util.Arrays;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.functions.RichMapFunction;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;
import org.apache.flink.util.ParameterTool;

/**
 * The same shape as sjob's savepoint benchmark job: a generator of (key, 240-byte string payload),
 * keyBy key, the max payload per key in a ValueState (heap state: one string per key), a
 * discarding sink; uids set.
 *
 * <p>With --stats FILE the keyed function also measures processing stalls: the longest gap
 * between consecutive processElement calls, over all subtasks of this job in this TaskManager,
 * sampled every 5 ms (sjob samples its longest batch per 5 ms the same way). Every sample is a
 * line "epochMillis gapMicros" in FILE, and the first record's time a line "first epochMillis",
 * so the benchmark can pick the windows while a savepoint was written and the time the restored
 * job processed its first record, without waiting for Flink's metric refreshes. The file is
 * local to the TaskManager: this fits a one-machine benchmark only.
 */
public class BigStateJob {
  public static void main(String[] args) throws Exception {
    ParameterTool p = ParameterTool.fromArgs(args);
    long keys = p.getLong("keys", 4_000_000);
    int payload = p.getInt("payload", 240);
    String stats = p.get("stats", "");
    StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
    env.fromSequence(0, Long.MAX_VALUE).uid("source")
      .map(new Generate(keys, payload)).uid("generate").returns(Types.TUPLE(Types.LONG, Types.STRING))
      .keyBy(r -> r.f0)
      .process(new Latest(stats)).uid("latest").name("latest")
      .sinkTo(new DiscardingSink<>()).uid("sink");
    env.execute("big-state-job");
  }

  /**
   * Record i is (i % keys, i in hex padded with '.'), like sjob's generator. The source's own
   * numbers are ignored: fromSequence gives each subtask one contiguous half of the range, so
   * i % keys would not reach every key soon; here the subtasks interleave (i = n * P + subtask),
   * so every key is seen once after `keys` records in all.
   */
  static final class Generate extends RichMapFunction<Long, Tuple2<Long, String>> {
    final long keys;
    final int payload;
    transient long next, step;

    Generate(long keys, int payload) { this.keys = keys; this.payload = payload; }

    @Override public void open(OpenContext ctx) {
      next = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
      step = getRuntimeContext().getTaskInfo().getNumberOfParallelSubtasks();
    }

    @Override public Tuple2<Long, String> map(Long ignored) {
      long i = next;
      next += step;
      char[] s = new char[payload];
      Arrays.fill(s, '.');
      for (int d = 0; d < 16; d++) {
        if (d < payload) s[d] = Character.forDigit((int) (i >>> (60 - 4 * d)) & 0xf, 16);
      }
      return Tuple2.of(i % keys, new String(s));
    }
  }

  /** Keeps the greatest payload per key (sjob's `max` over a string field). */
  static final class Latest extends KeyedProcessFunction<Long, Tuple2<Long, String>, Long> {
    final String stats;
    transient ValueState<String> max;
    transient long last; // System.nanoTime() of this subtask's previous record, 0 before the first

    Latest(String stats) { this.stats = stats; }

    @Override public void open(OpenContext ctx) throws IOException {
      max = getRuntimeContext().getState(new ValueStateDescriptor<>("max", String.class));
      if (!stats.isEmpty()) Sampler.acquire(stats);
    }

    @Override public void processElement(Tuple2<Long, String> r, Context ctx, Collector<Long> out) throws Exception {
      if (!stats.isEmpty()) {
        long now = System.nanoTime();
        if (last == 0) Sampler.FIRST_MS.compareAndSet(0, System.currentTimeMillis());
        else if (now - last > Sampler.MAX_GAP_NS.get()) Sampler.MAX_GAP_NS.accumulateAndGet(now - last, Math::max);
        last = now;
      }
      String cur = max.value();
      if (cur == null || r.f1.compareTo(cur) > 0) max.update(r.f1);
    }

    @Override public void close() throws Exception {
      if (!stats.isEmpty()) Sampler.release();
    }
  }

  /**
   * One sampling thread per job and TaskManager, shared by the job's subtasks (statics live in
   * the job's own class loader), so that a sample is the longest stall of any subtask, as sjob's
   * is over all its tasks.
   */
  static final class Sampler {
    static final AtomicLong MAX_GAP_NS = new AtomicLong();
    static final AtomicLong FIRST_MS = new AtomicLong();
    static int users;
    static Thread thread;

    static synchronized void acquire(String file) throws IOException {
      if (users++ > 0) return;
      Writer w = new FileWriter(file, true);
      thread = new Thread(() -> {
        boolean firstWritten = false;
        try (w) {
          MAX_GAP_NS.set(0);
          while (!Thread.currentThread().isInterrupted()) {
            Thread.sleep(5);
            long gap = MAX_GAP_NS.getAndSet(0);
            w.write(System.currentTimeMillis() + " " + gap / 1000 + "\n");
            if (!firstWritten && FIRST_MS.get() != 0) {
              w.write("first " + FIRST_MS.get() + "\n");
              firstWritten = true;
            }
            w.flush(); // a few hundred small writes a second: readable while the job runs
          }
        } catch (InterruptedException | IOException e) {
          // stopped by release(), or the file went away: end sampling
        }
      }, "stall-sampler");
      thread.setDaemon(true);
      thread.start();
    }

    static synchronized void release() throws InterruptedException {
      if (--users > 0) return;
      thread.interrupt();
      thread.join();
    }
  }
}
