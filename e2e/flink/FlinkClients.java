package demo;

import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.flink.api.common.JobID;
import org.apache.flink.api.common.JobStatus;
import org.apache.flink.client.deployment.StandaloneClusterId;
import org.apache.flink.client.program.rest.RestClusterClient;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.RestOptions;
import org.apache.flink.core.execution.SavepointFormatType;
import org.apache.flink.runtime.client.JobStatusMessage;
import org.apache.flink.runtime.rest.messages.ClusterOverviewHeaders;
import org.apache.flink.runtime.rest.messages.DashboardConfigurationHeaders;
import org.apache.flink.runtime.rest.messages.EmptyMessageParameters;
import org.apache.flink.runtime.rest.messages.EmptyRequestBody;
import org.apache.flink.runtime.rest.messages.JobExceptionsHeaders;
import org.apache.flink.runtime.rest.messages.JobIdsWithStatusesOverviewHeaders;
import org.apache.flink.runtime.rest.messages.JobMessageParameters;
import org.apache.flink.runtime.rest.messages.JobPlanHeaders;
import org.apache.flink.runtime.rest.messages.JobVertexMessageParameters;
import org.apache.flink.runtime.rest.messages.JobsOverviewHeaders;
import org.apache.flink.runtime.rest.messages.MessageHeaders;
import org.apache.flink.runtime.rest.messages.MessageParameters;
import org.apache.flink.runtime.rest.messages.checkpoints.CheckpointConfigHeaders;
import org.apache.flink.runtime.rest.messages.checkpoints.CheckpointingStatisticsHeaders;
import org.apache.flink.runtime.rest.messages.job.JobDetailsHeaders;
import org.apache.flink.runtime.rest.messages.job.JobDetailsInfo;
import org.apache.flink.runtime.rest.messages.job.JobExceptionsMessageParameters;
import org.apache.flink.runtime.rest.messages.job.JobStatusInfoHeaders;
import org.apache.flink.runtime.rest.messages.job.metrics.JobVertexWatermarksHeaders;
import org.apache.flink.runtime.rest.messages.job.metrics.Metric;
import org.apache.flink.runtime.rest.messages.job.metrics.MetricCollectionResponseBody;

/**
 * Flink's own REST client (RestClusterClient, as Flink's Kubernetes operator uses it) against a
 * server of Flink's REST API. Prints one line per step ("ok ..."); a step that fails prints
 * "failed ..." with the cause and the program exits 1.
 *
 * <pre>
 *   FlinkClients read HOST PORT JOB            every response the client reads, deserialized
 *   FlinkClients lifecycle HOST PORT JOB DIR BAD
 *       savepoint to DIR, dispose it, a savepoint to BAD (must fail), stop with a savepoint
 *   FlinkClients cancel HOST PORT JOB          cancel, then wait until CANCELED
 * </pre>
 */
public final class FlinkClients {
    private static final long TIMEOUT_S = 60;

    public static void main(String[] args) throws Exception {
        Configuration conf = new Configuration();
        conf.set(RestOptions.ADDRESS, args[1]);
        conf.set(RestOptions.PORT, Integer.parseInt(args[2]));
        conf.set(RestOptions.RETRY_MAX_ATTEMPTS, 0);
        JobID job = JobID.fromHexString(args[3]);
        try (RestClusterClient<StandaloneClusterId> client =
                new RestClusterClient<>(conf, StandaloneClusterId.getInstance())) {
            switch (args[0]) {
                case "read" -> read(client, job);
                case "lifecycle" -> lifecycle(client, job, args[4], args[5]);
                case "cancel" -> cancel(client, job);
                default -> throw new IllegalArgumentException("unknown command " + args[0]);
            }
        } catch (StepFailed e) {
            System.out.println("failed " + e.getMessage());
            System.exit(1);
        }
    }

    /** A step that did not go as it should. */
    private static final class StepFailed extends Exception {
        StepFailed(String step, Throwable cause) {
            super(step + ": " + causes(cause));
        }
    }

    private static String causes(Throwable t) {
        List<String> parts = new ArrayList<>();
        for (Throwable c = t; c != null && parts.size() < 8; c = c.getCause()) {
            parts.add(c.toString().replace('\n', ' '));
        }
        return String.join(" <- ", parts);
    }

    private interface Step<T> {
        T run() throws Exception;
    }

    private static <T> T step(String name, Step<T> s) throws StepFailed {
        try {
            return s.run();
        } catch (Exception e) {
            throw new StepFailed(name, e instanceof ExecutionException ? e.getCause() : e);
        }
    }

    @SuppressWarnings({"unchecked", "rawtypes"})
    private static Object get(
            RestClusterClient<?> client, MessageHeaders headers, MessageParameters params)
            throws Exception {
        return client.sendRequest(headers, params, EmptyRequestBody.getInstance())
                .get(TIMEOUT_S, TimeUnit.SECONDS);
    }

    private static <P extends JobMessageParameters> P forJob(P params, JobID job) {
        params.jobPathParameter.resolve(job);
        return params;
    }

    private static void read(RestClusterClient<?> client, JobID job) throws Exception {
        Collection<JobStatusMessage> jobs =
                step("listJobs", () -> client.listJobs().get(TIMEOUT_S, TimeUnit.SECONDS));
        for (JobStatusMessage j : jobs) {
            System.out.println("ok listJobs " + j.getJobId() + " " + j.getJobName() + " " + j.getJobState());
        }
        JobStatus status =
                step("getJobStatus", () -> client.getJobStatus(job).get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok getJobStatus " + status);
        JobDetailsInfo details =
                step("getJobDetails", () -> client.getJobDetails(job).get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println(
                "ok getJobDetails " + details.getName() + " " + details.getJobStatus()
                        + " vertices=" + details.getJobVertexInfos().size());
        EmptyMessageParameters none = EmptyMessageParameters.getInstance();
        Object[][] endpoints = {
            {"/overview", ClusterOverviewHeaders.getInstance(), none},
            {"/config", DashboardConfigurationHeaders.getInstance(), none},
            {"/jobs", JobIdsWithStatusesOverviewHeaders.getInstance(), none},
            {"/jobs/overview", JobsOverviewHeaders.getInstance(), none},
            {"/jobs/:id", JobDetailsHeaders.getInstance(), forJob(new JobMessageParameters(), job)},
            {"/jobs/:id/status", JobStatusInfoHeaders.getInstance(), forJob(new JobMessageParameters(), job)},
            {"/jobs/:id/plan", JobPlanHeaders.getInstance(), forJob(new JobMessageParameters(), job)},
            {"/jobs/:id/exceptions", JobExceptionsHeaders.getInstance(), forJob(new JobExceptionsMessageParameters(), job)},
            {"/jobs/:id/checkpoints", CheckpointingStatisticsHeaders.getInstance(), forJob(new JobMessageParameters(), job)},
            {"/jobs/:id/checkpoints/config", CheckpointConfigHeaders.getInstance(), forJob(new JobMessageParameters(), job)},
        };
        for (Object[] e : endpoints) {
            Object body = step((String) e[0], () -> get(client, (MessageHeaders) e[1], (MessageParameters) e[2]));
            System.out.println("ok " + e[0] + " " + body.getClass().getSimpleName());
        }
        // Each vertex's input watermarks, as the web UI reads them: "ok watermarks <name> <id>=<value> ...".
        for (JobDetailsInfo.JobVertexDetailsInfo v : details.getJobVertexInfos()) {
            JobVertexMessageParameters params = forJob(new JobVertexMessageParameters(), job);
            params.jobVertexIdPathParameter.resolve(v.getJobVertexID());
            MetricCollectionResponseBody body = (MetricCollectionResponseBody) step(
                    "/jobs/:id/vertices/:vid/watermarks",
                    () -> get(client, JobVertexWatermarksHeaders.INSTANCE, params));
            StringBuilder line = new StringBuilder("ok watermarks " + v.getName());
            for (Metric m : body.getMetrics()) {
                line.append(' ').append(m.getId()).append('=').append(m.getValue());
            }
            System.out.println(line);
        }
    }

    private static void lifecycle(RestClusterClient<?> client, JobID job, String dir, String bad)
            throws Exception {
        String savepoint = step("triggerSavepoint", () -> client
                .triggerSavepoint(job, dir, SavepointFormatType.CANONICAL)
                .get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok triggerSavepoint " + savepoint);
        step("disposeSavepoint", () -> client.disposeSavepoint(savepoint).get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok disposeSavepoint " + savepoint);
        try {
            String where = client.triggerSavepoint(job, bad, SavepointFormatType.CANONICAL)
                    .get(TIMEOUT_S, TimeUnit.SECONDS);
            throw new StepFailed("triggerSavepoint to " + bad, new IllegalStateException("succeeded: " + where));
        } catch (ExecutionException e) {
            System.out.println("ok triggerSavepoint refused " + causes(e.getCause()));
        }
        String last = step("stopWithSavepoint", () -> client
                .stopWithSavepoint(job, false, dir, SavepointFormatType.CANONICAL)
                .get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok stopWithSavepoint " + last);
        JobStatus status =
                step("getJobStatus", () -> client.getJobStatus(job).get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok getJobStatus " + status);
    }

    private static void cancel(RestClusterClient<?> client, JobID job) throws Exception {
        step("cancel", () -> client.cancel(job).get(TIMEOUT_S, TimeUnit.SECONDS));
        System.out.println("ok cancel");
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(TIMEOUT_S);
        JobStatus status;
        do {
            status = step("getJobStatus", () -> client.getJobStatus(job).get(TIMEOUT_S, TimeUnit.SECONDS));
            if (status.isGloballyTerminalState()) {
                break;
            }
            Thread.sleep(100);
        } while (System.nanoTime() < deadline);
        System.out.println("ok getJobStatus " + status);
    }
}
