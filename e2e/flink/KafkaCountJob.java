package demo;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.serialization.SerializationSchema;
import org.apache.flink.api.common.serialization.SimpleStringSchema;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.connector.base.DeliveryGuarantee;
import org.apache.flink.connector.kafka.sink.KafkaRecordSerializationSchema;
import org.apache.flink.connector.kafka.sink.KafkaSink;
import org.apache.flink.connector.kafka.source.KafkaSource;
import org.apache.flink.connector.kafka.source.enumerator.initializer.OffsetsInitializer;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.streaming.api.CheckpointingMode;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;
import org.apache.flink.util.ParameterTool;

import java.nio.charset.StandardCharsets;

/**
 * The Kafka benchmark's job on Flink, the same work as sjob's: JSON values from --input (read
 * committed, from the earliest offset), keyed by their "key" field, counted, each new count
 * written as {"key","count"} (Kafka key: the key) to --output with an exactly-once KafkaSink,
 * checkpoints every --checkpoint-ms.
 */
public class KafkaCountJob {
  public static void main(String[] args) throws Exception {
    ParameterTool p = ParameterTool.fromArgs(args);
    String bootstrap = p.getRequired("bootstrap");
    StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
    env.enableCheckpointing(p.getLong("checkpoint-ms", 10_000), CheckpointingMode.EXACTLY_ONCE);
    KafkaSource<String> source = KafkaSource.<String>builder()
        .setBootstrapServers(bootstrap)
        .setTopics(p.getRequired("input"))
        .setGroupId("flink-bench")
        .setStartingOffsets(OffsetsInitializer.earliest())
        .setValueOnlyDeserializer(new SimpleStringSchema())
        .setProperty("isolation.level", "read_committed")
        .build();
    KafkaSink<Tuple2<String, Long>> sink = KafkaSink.<Tuple2<String, Long>>builder()
        .setBootstrapServers(bootstrap)
        .setRecordSerializer(KafkaRecordSerializationSchema.<Tuple2<String, Long>>builder()
            .setTopic(p.getRequired("output"))
            .setKeySerializationSchema(new SerializationSchema<Tuple2<String, Long>>() {
              @Override public byte[] serialize(Tuple2<String, Long> t) {
                return t.f0.getBytes(StandardCharsets.UTF_8);
              }
            })
            .setValueSerializationSchema(new SerializationSchema<Tuple2<String, Long>>() {
              @Override public byte[] serialize(Tuple2<String, Long> t) {
                return ("{\"key\":\"" + t.f0 + "\",\"count\":" + t.f1 + "}").getBytes(StandardCharsets.UTF_8);
              }
            })
            .build())
        .setDeliveryGuarantee(DeliveryGuarantee.EXACTLY_ONCE)
        .setTransactionalIdPrefix(p.get("txn-prefix", "flink-bench"))
        .setProperty("transaction.timeout.ms", "900000")
        .build();
    env.fromSource(source, WatermarkStrategy.noWatermarks(), "kafka").uid("source")
        .map(new org.apache.flink.api.common.functions.RichMapFunction<String, String>() {
          transient ObjectMapper json;
          @Override public void open(OpenContext ctx) { json = new ObjectMapper(); }
          @Override public String map(String v) throws Exception {
            JsonNode n = json.readTree(v);
            return n.get("key").asText();
          }
        }).uid("parse")
        .keyBy(k -> k)
        .process(new KeyedProcessFunction<String, String, Tuple2<String, Long>>() {
          transient ValueState<Long> count;
          @Override public void open(OpenContext ctx) {
            count = getRuntimeContext().getState(new ValueStateDescriptor<>("count", Long.class));
          }
          @Override public void processElement(String k, Context ctx, Collector<Tuple2<String, Long>> out) throws Exception {
            Long c = count.value();
            long next = c == null ? 1L : c + 1;
            count.update(next);
            out.collect(Tuple2.of(k, next));
          }
        }).uid("counter")
        .sinkTo(sink).uid("sink");
    env.execute("kafka-count-job");
  }
}
