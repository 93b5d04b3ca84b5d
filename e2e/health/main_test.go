package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

const argocdDir = "../../config/argocd"

// What kstatus and Argo CD make of each object in testdata: status, and a
// part of the message.
var expected = []struct {
	file                string
	kstatus, kstatusMsg string
	argocd, argocdMsg   string
}{
	// No status: kstatus has nothing to go on and calls it Current.
	{"statefuljob-no-status.json", "Current", "Resource is current",
		"Progressing", "waiting for the operator to observe generation 1"},
	{"statefuljob-not-observed.json", "InProgress", "generation is 3, but latest observed generation is 2",
		"Progressing", "waiting for the operator to observe generation 3"},
	{"statefuljob-deploying.json", "InProgress", "Deploying: starting the engine",
		"Progressing", "Deploying: starting the engine"},
	{"statefuljob-running.json", "Current", "Resource is Ready",
		"Healthy", "Running: job 5c2e9f0a is running"},
	{"statefuljob-upgrading.json", "InProgress", "Upgrading: stage Savepointing",
		"Progressing", "Upgrading: upgrade stage Savepointing (last error: savepoint timed out after 60s)"},
	{"statefuljob-rollingback.json", "InProgress", "RollingBack: stage RollingBack",
		"Progressing", "RollingBack: upgrade stage RollingBack"},
	{"statefuljob-suspending.json", "InProgress", "Suspending: stage Savepointing",
		"Progressing", "Suspending: upgrade stage Savepointing"},
	{"statefuljob-suspending-no-upgrade.json", "InProgress", "Suspending: removing the engine",
		"Progressing", "Suspending: removing the engine"},
	// Reconciling and Stalled False, Ready False: kstatus falls back on Ready.
	{"statefuljob-suspended.json", "Current", "Resource is Ready",
		"Suspended", "Suspended: suspended by spec.state"},
	{"statefuljob-blocked.json", "Failed", `operator uid "window" is new`,
		"Degraded", `Blocked: operator uid "window" is new`},
	{"statefuljob-failed.json", "Failed", "the engine exited with status 1",
		"Degraded", "Failed: the engine exited with status 1"},
	// Without Stalled, kstatus cannot tell Failed from not yet Ready.
	{"statefuljob-failed-without-stalled.json", "InProgress", "the engine exited with status 1",
		"Degraded", "Failed: the engine exited with status 1"},
	{"statefuljob-invalid-spec-running.json", "Failed", "spec.job: operator 2 (discardSink) has no input",
		"Degraded", "Running: spec.job: operator 2 (discardSink) has no input"},
	{"statefuljob-terminating.json", "Terminating", "Resource scheduled for deletion",
		"Progressing", "Pending deletion"},
	// Savepoints have no conditions and no observedGeneration: always Current.
	{"savepoint-no-status.json", "Current", "Resource is current",
		"Progressing", "waiting for the operator to take the savepoint"},
	{"savepoint-pending.json", "Current", "Resource is current", "Progressing", "Pending"},
	{"savepoint-inprogress.json", "Current", "Resource is current", "Progressing", "InProgress"},
	{"savepoint-completed.json", "Current", "Resource is current",
		"Healthy", "Completed: /savepoints/orders/sp-0008"},
	{"savepoint-failed.json", "Current", "Resource is current",
		"Degraded", "Failed: the job is not running"},
}

func TestTestdata(t *testing.T) {
	checks, err := LoadChecks(argocdDir)
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]bool{}
	for _, want := range expected {
		listed[want.file] = true
		t.Run(want.file, func(t *testing.T) {
			got, err := checks.Evaluate(filepath.Join("testdata", want.file))
			if err != nil {
				t.Fatal(err)
			}
			if got.Kstatus != want.kstatus || !strings.Contains(got.KstatusMessage, want.kstatusMsg) {
				t.Errorf("kstatus %s %q, want %s with %q", got.Kstatus, got.KstatusMessage, want.kstatus, want.kstatusMsg)
			}
			if got.ArgoCD != want.argocd || !strings.Contains(got.ArgoCDMessage, want.argocdMsg) {
				t.Errorf("Argo CD %s %q, want %s with %q", got.ArgoCD, got.ArgoCDMessage, want.argocd, want.argocdMsg)
			}
		})
	}
	files, err := filepath.Glob("testdata/*.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !listed[filepath.Base(f)] {
			t.Errorf("%s has no expected statuses in this test", f)
		}
	}
}

// Each phase has a testdata object.
func TestEveryPhaseAndState(t *testing.T) {
	checks, err := LoadChecks(argocdDir)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, want := range expected {
		got, err := checks.Evaluate(filepath.Join("testdata", want.file))
		if err != nil {
			t.Fatal(err)
		}
		seen[got.Kind+"/"+got.Phase+got.State] = true
	}
	for _, p := range []string{"Deploying", "Running", "Upgrading", "RollingBack", "Suspending", "Suspended", "Blocked", "Failed", ""} {
		if !seen["StatefulJob/"+p] {
			t.Errorf("no StatefulJob with phase %q", p)
		}
	}
	for _, s := range []string{"Pending", "InProgress", "Completed", "Failed", ""} {
		if !seen["Savepoint/"+s] {
			t.Errorf("no Savepoint with state %q", s)
		}
	}
}

func TestRunPrintsOneLinePerFile(t *testing.T) {
	var out bytes.Buffer
	err := run([]string{"--argocd-dir", argocdDir, "testdata/statefuljob-running.json", "testdata/savepoint-failed.json"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d lines: %s", len(lines), out.String())
	}
	var first map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"file": "testdata/statefuljob-running.json", "kind": "StatefulJob", "name": "orders",
		"phase": "Running", "kstatus": "Current", "kstatusMessage": "Resource is Ready",
		"argocd": "Healthy", "argocdMessage": "Running: job 5c2e9f0a is running",
	}
	if !reflect.DeepEqual(first, want) {
		t.Errorf("got %v\nwant %v", first, want)
	}
	var second map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
		t.Fatal(err)
	}
	if second["state"] != "Failed" || second["phase"] != nil || second["argocd"] != "Degraded" {
		t.Errorf("savepoint line: %v", second)
	}
}

func TestRunWithoutFilesOnlyChecks(t *testing.T) {
	var out bytes.Buffer
	if err := run([]string{"--argocd-dir", argocdDir}, &out); err != nil || out.Len() != 0 {
		t.Errorf("err %v, output %q", err, out.String())
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{{}, {"testdata/statefuljob-running.json"}, {"--argocd"}} {
		err := run(args, &bytes.Buffer{})
		if _, ok := err.(usageError); !ok {
			t.Errorf("%v: %v, want a usage error", args, err)
		}
	}
}

func TestYAMLObject(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sjob.yaml")
	write(t, path, `apiVersion: sjob.dev/v1alpha1
kind: StatefulJob
metadata:
  name: orders
  generation: 2
spec: {}
status:
  observedGeneration: 2
  phase: Upgrading
  upgrade:
    stage: Verifying
  conditions:
    - type: Reconciling
      status: "True"
      reason: Upgrading
      message: "Upgrading: stage Verifying"
`)
	checks, err := LoadChecks(argocdDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := checks.Evaluate(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kstatus != "InProgress" || got.ArgoCD != "Progressing" || got.ArgoCDMessage != "Upgrading: upgrade stage Verifying" {
		t.Errorf("%+v", got)
	}
}

func TestUnreadableObjects(t *testing.T) {
	checks, err := LoadChecks(argocdDir)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, text := range map[string]string{
		"broken.json":    `{"kind": "StatefulJob",`,
		"nokind.json":    `{"apiVersion": "sjob.dev/v1alpha1", "metadata": {"name": "x"}}`,
		"otherkind.json": `{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}`,
		"broken.yaml":    "kind: [StatefulJob\n",
	} {
		path := filepath.Join(dir, name)
		write(t, path, text)
		if _, err := checks.Evaluate(path); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := checks.Evaluate(filepath.Join(dir, "missing.json")); err == nil {
		t.Error("missing file: no error")
	}
}

// A field kstatus cannot read makes it Unknown (as the status poller reports
// it), not an error.
func TestKstatusErrorIsUnknown(t *testing.T) {
	checks, err := LoadChecks(argocdDir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "null.json")
	write(t, path, `{"apiVersion": "sjob.dev/v1alpha1", "kind": "StatefulJob",
		"metadata": {"name": "orders", "generation": 1},
		"status": {"observedGeneration": null, "phase": "Running"}}`)
	got, err := checks.Evaluate(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Kstatus != "Unknown" || !strings.Contains(got.KstatusMessage, "observedGeneration") {
		t.Errorf("kstatus %s %q", got.Kstatus, got.KstatusMessage)
	}
	if got.ArgoCD != "Progressing" {
		t.Errorf("Argo CD %s %q", got.ArgoCD, got.ArgoCDMessage)
	}
}

// The argocd-cm snippet and the .lua files must not drift apart.
func TestConfigMapMustMatchScripts(t *testing.T) {
	cm := read(t, filepath.Join(argocdDir, configMapFile))
	for name, edit := range map[string]func(string) string{
		"changed line": func(s string) string {
			return strings.Replace(s, `hs.message = "Completed"`, `hs.message = "Done"`, 1)
		},
		"extra line": func(s string) string {
			return strings.Replace(s, "    return hs\n", "    return hs\n    -- end\n", 1)
		},
		"missing key": func(s string) string {
			return strings.Replace(s, "sjob.dev_Savepoint:", "sjob.dev_SavePoint:", 1)
		},
	} {
		t.Run(name, func(t *testing.T) {
			edited := edit(cm)
			if edited == cm {
				t.Fatal("the edit changed nothing")
			}
			dir := copyArgoDir(t)
			write(t, filepath.Join(dir, configMapFile), edited)
			_, err := LoadChecks(dir)
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			if err := run([]string{"--argocd-dir", dir}, &bytes.Buffer{}); err == nil {
				t.Error("run: no error")
			}
		})
	}
}

// Scripts that fail, return no table or an unknown status are errors.
func TestLuaErrors(t *testing.T) {
	sp := read(t, filepath.Join(argocdDir, "health-savepoint.lua"))
	for name, script := range map[string]string{
		"runtime error":  "error(\"boom\")\n",
		"nil field":      "return {status = obj.status.nothing.here}\n",
		"not a table":    "return \"Healthy\"\n",
		"unknown status": "return {status = \"Fine\", message = \"ok\"}\n",
		"bad message":    "return {status = \"Healthy\", message = {}}\n",
		"syntax error":   "return {\n",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, filepath.Join(dir, "health-statefuljob.lua"), script)
			write(t, filepath.Join(dir, "health-savepoint.lua"), sp)
			write(t, filepath.Join(dir, configMapFile), configMap(script, sp))
			var out bytes.Buffer
			err := run([]string{"--argocd-dir", dir, "testdata/statefuljob-running.json"}, &out)
			if err == nil {
				t.Fatalf("no error; output %s", out.String())
			}
			t.Log(err)
		})
	}
}

// A Lua script that never ends is stopped.
func TestLuaTimeout(t *testing.T) {
	defer func(d time.Duration) { luaTimeout = d }(luaTimeout)
	luaTimeout = 200 * time.Millisecond
	sp := read(t, filepath.Join(argocdDir, "health-savepoint.lua"))
	script := "while true do end\n"
	dir := t.TempDir()
	write(t, filepath.Join(dir, "health-statefuljob.lua"), script)
	write(t, filepath.Join(dir, "health-savepoint.lua"), sp)
	write(t, filepath.Join(dir, configMapFile), configMap(script, sp))
	if err := run([]string{"--argocd-dir", dir, "testdata/statefuljob-running.json"}, &bytes.Buffer{}); err == nil {
		t.Fatal("no error")
	}
}

func configMap(sjob, sp string) string {
	indent := func(s string) string {
		var b strings.Builder
		for _, line := range strings.SplitAfter(s, "\n") {
			if strings.TrimSpace(line) != "" {
				b.WriteString("    ")
			}
			b.WriteString(line)
		}
		return b.String()
	}
	return "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: argocd-cm\ndata:\n" +
		"  resource.customizations.health.sjob.dev_StatefulJob: |\n" + indent(sjob) +
		"  resource.customizations.health.sjob.dev_Savepoint: |\n" + indent(sp)
}

func copyArgoDir(t *testing.T) string {
	dir := t.TempDir()
	for _, name := range []string{"health-statefuljob.lua", "health-savepoint.lua", configMapFile} {
		write(t, filepath.Join(dir, name), read(t, filepath.Join(argocdDir, name)))
	}
	return dir
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func write(t *testing.T, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}
