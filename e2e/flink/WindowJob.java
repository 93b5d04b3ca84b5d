package demo;

import java.time.Duration;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.AggregateFunction;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.functions.RichMapFunction;
import org.apache.flink.api.java.tuple.Tuple5;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.streaming.api.windowing.assigners.TumblingEventTimeWindows;
import org.apache.flink.util.ParameterTool;

/**
 * The records of sjob's generator (record i: event time i ms, key i mod keys, value i mod 1000),
 * dealt round robin over the source subtasks, into tumbling event-time windows of --size-ms
 * per key computing count, sum, min, max and avg of the value, as sjob's window operator with
 * five aggregates does.
 */
public class WindowJob {
  /** Numbers each subtask's records so that the subtasks interleave in event time. */
  static final class EventTime extends RichMapFunction<Long, Long> {
    private long next;
    private int step;
    @Override public void open(OpenContext ctx) {
      next = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
      step = getRuntimeContext().getTaskInfo().getNumberOfParallelSubtasks();
    }
    @Override public Long map(Long ignored) {
      long t = next;
      next += step;
      return t;
    }
  }

  /** count, sum, min, max of the value; avg = sum / count. */
  static final class Stats implements AggregateFunction<Long, long[], Tuple5<Long, Long, Long, Long, Double>> {
    @Override public long[] createAccumulator() { return new long[] {0, 0, Long.MAX_VALUE, Long.MIN_VALUE}; }
    @Override public long[] add(Long t, long[] a) {
      long v = t % 1000;
      a[0]++; a[1] += v; a[2] = Math.min(a[2], v); a[3] = Math.max(a[3], v);
      return a;
    }
    @Override public Tuple5<Long, Long, Long, Long, Double> getResult(long[] a) {
      return Tuple5.of(a[0], a[1], a[2], a[3], a[0] == 0 ? 0.0 : (double) a[1] / a[0]);
    }
    @Override public long[] merge(long[] a, long[] b) {
      return new long[] {a[0] + b[0], a[1] + b[1], Math.min(a[2], b[2]), Math.max(a[3], b[3])};
    }
  }

  public static void main(String[] args) throws Exception {
    ParameterTool p = ParameterTool.fromArgs(args);
    long keys = p.getLong("keys", 100000);
    long size = p.getLong("size-ms", 1000000);
    StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
    env.fromSequence(0, Long.MAX_VALUE).uid("source")
      .map(new EventTime()).uid("event-time")
      .assignTimestampsAndWatermarks(
          WatermarkStrategy.<Long>forMonotonousTimestamps().withTimestampAssigner((t, ts) -> t))
      .uid("watermarks")
      .keyBy(t -> t % keys)
      .window(TumblingEventTimeWindows.of(Duration.ofMillis(size)))
      .aggregate(new Stats()).uid("windows")
      .sinkTo(new DiscardingSink<>()).uid("sink");
    env.execute("window-job");
  }
}
