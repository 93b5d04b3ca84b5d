// Command health reports what GitOps tools make of sjob's custom resources:
// kstatus (sigs.k8s.io/cli-utils, the status library Flux's health checks
// use) and the Argo CD health checks in config/argocd, run in gopher-lua (the
// Lua interpreter Argo CD embeds) with the global obj set as Argo CD sets it.
//
//	health --argocd-dir DIR [FILE...]
//
// DIR holds health-statefuljob.lua, health-savepoint.lua and
// argocd-cm-health.yaml; the Lua in the argocd-cm snippet must be
// byte-identical to the .lua files. Each FILE holds one StatefulJob or
// Savepoint object as JSON or YAML; for each, one JSON line goes to stdout.
// With no FILE only the scripts and the snippet are checked. Exit status: 0,
// 1 on unreadable input, a Lua error or scripts that differ, 2 on bad usage.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"github.com/yuin/gopher-lua/parse"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

const (
	group         = "sjob.dev"
	configMapFile = "argocd-cm-health.yaml"
	// argocd-cm's key for a health check is this prefix + GROUP_KIND.
	healthKeyPrefix = "resource.customizations.health."
)

// How long one script may run (Argo CD also runs its Lua under a timeout).
var luaTimeout = 5 * time.Second

// The Lua file holding each kind's health check.
var scriptFiles = map[string]string{
	"StatefulJob": "health-statefuljob.lua",
	"Savepoint":   "health-savepoint.lua",
}

// The health statuses an Argo CD health check may return.
var argoStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

// Result is the line printed for one object.
type Result struct {
	File           string `json:"file"`
	Kind           string `json:"kind"`
	Name           string `json:"name"`
	Phase          string `json:"phase,omitempty"`
	State          string `json:"state,omitempty"`
	Kstatus        string `json:"kstatus"`
	KstatusMessage string `json:"kstatusMessage"`
	ArgoCD         string `json:"argocd"`
	ArgoCDMessage  string `json:"argocdMessage"`
}

// Checks holds the compiled Argo CD health check of each kind.
type Checks map[string]*lua.FunctionProto

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	err := run(os.Args[1:], os.Stdout)
	var usage usageError
	switch {
	case err == nil:
	case errors.As(err, &usage):
		fmt.Fprintf(os.Stderr, "health: %s\nusage: health --argocd-dir DIR [FILE...]\n", usage.msg)
		os.Exit(2)
	default:
		fmt.Fprintf(os.Stderr, "health: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	flags := flag.NewFlagSet("health", flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	dir := flags.String("argocd-dir", "", "the folder with the Argo CD health checks (config/argocd)")
	if err := flags.Parse(args); err != nil {
		return usageError{err.Error()}
	}
	if *dir == "" {
		return usageError{"--argocd-dir is required"}
	}
	checks, err := LoadChecks(*dir)
	if err != nil {
		return err
	}
	out := json.NewEncoder(stdout)
	out.SetEscapeHTML(false)
	for _, file := range flags.Args() {
		res, err := checks.Evaluate(file)
		if err != nil {
			return err
		}
		if err := out.Encode(res); err != nil {
			return err
		}
	}
	return nil
}

// LoadChecks reads and compiles the .lua files in dir and checks that
// argocd-cm-health.yaml carries exactly the same text under each kind's key.
func LoadChecks(dir string) (Checks, error) {
	cmPath := filepath.Join(dir, configMapFile)
	raw, err := os.ReadFile(cmPath)
	if err != nil {
		return nil, err
	}
	var cm struct {
		Kind string            `json:"kind"`
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(raw, &cm); err != nil {
		return nil, fmt.Errorf("%s: %w", cmPath, err)
	}
	if cm.Kind != "ConfigMap" {
		return nil, fmt.Errorf("%s: kind is %q, not ConfigMap", cmPath, cm.Kind)
	}
	checks := Checks{}
	for kind, name := range scriptFiles {
		path := filepath.Join(dir, name)
		src, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		key := healthKeyPrefix + group + "_" + kind
		inline, ok := cm.Data[key]
		if !ok {
			return nil, fmt.Errorf("%s: data has no key %s (the text of %s)", cmPath, key, name)
		}
		if inline != string(src) {
			return nil, fmt.Errorf("%s: data[%s] differs from %s %s; "+
				"make the ConfigMap's text (indented 4 spaces under `%s: |`) the file's text",
				cmPath, key, name, firstDifference(inline, string(src)), key)
		}
		chunk, err := parse.Parse(bytes.NewReader(src), name)
		if err != nil {
			return nil, fmt.Errorf("%s: %s", path, strings.TrimSpace(err.Error()))
		}
		proto, err := lua.Compile(chunk, name)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		checks[kind] = proto
	}
	return checks, nil
}

// firstDifference says where two texts first differ, by line.
func firstDifference(configMap, file string) string {
	a, b := strings.SplitAfter(configMap, "\n"), strings.SplitAfter(file, "\n")
	line := func(lines []string, i int) string {
		if i < len(lines) {
			return fmt.Sprintf("%q", lines[i])
		}
		return "(end of text)"
	}
	for i := 0; i < len(a) || i < len(b); i++ {
		if i >= len(a) || i >= len(b) || a[i] != b[i] {
			return fmt.Sprintf("at line %d: ConfigMap %s, file %s", i+1, line(a, i), line(b, i))
		}
	}
	return ""
}

// ReadObject reads one Kubernetes object from a JSON or YAML file.
func ReadObject(path string) (*unstructured.Unstructured, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	data := bytes.TrimSpace(raw)
	if !bytes.HasPrefix(data, []byte("{")) {
		if data, err = yaml.YAMLToJSON(raw); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	// Decoded as the API machinery does: whole numbers become int64.
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(data); err != nil {
		return nil, fmt.Errorf("%s: not a Kubernetes object: %w", path, err)
	}
	return u, nil
}

// Evaluate computes kstatus and the Argo CD health of the object in path.
func (c Checks) Evaluate(path string) (*Result, error) {
	u, err := ReadObject(path)
	if err != nil {
		return nil, err
	}
	gvk := u.GroupVersionKind()
	proto, ok := c[gvk.Kind]
	if gvk.Group != group || !ok {
		return nil, fmt.Errorf("%s: %s is not a kind with an Argo CD health check here", path, gvk)
	}
	res := &Result{File: path, Kind: gvk.Kind, Name: u.GetName()}
	res.Phase, _, _ = unstructured.NestedString(u.Object, "status", "phase")
	res.State, _, _ = unstructured.NestedString(u.Object, "status", "state")

	// kstatus; an error is reported as Unknown, as cli-utils' status poller does.
	ks, err := status.Compute(u)
	if err != nil {
		res.Kstatus, res.KstatusMessage = string(status.UnknownStatus), err.Error()
	} else {
		res.Kstatus, res.KstatusMessage = string(ks.Status), ks.Message
	}

	// Argo CD reports an object being deleted as Progressing before it looks
	// for a health check.
	if u.GetDeletionTimestamp() != nil {
		res.ArgoCD, res.ArgoCDMessage = "Progressing", "Pending deletion"
		return res, nil
	}
	res.ArgoCD, res.ArgoCDMessage, err = RunHealthCheck(proto, u.Object)
	if err != nil {
		return nil, fmt.Errorf("%s: Argo CD health check for %s: %w", path, gvk.Kind, err)
	}
	return res, nil
}

// RunHealthCheck runs a compiled Argo CD health check with the global obj set
// to the object and returns the status and message of the table it returns.
func RunHealthCheck(proto *lua.FunctionProto, object map[string]any) (string, string, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	ctx, cancel := context.WithTimeout(context.Background(), luaTimeout)
	defer cancel()
	L.SetContext(ctx)
	// Only the libraries that cannot reach outside the script.
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.StringLibName, lua.OpenString},
		{lua.MathLibName, lua.OpenMath},
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), Protect: true}, lua.LString(lib.name)); err != nil {
			return "", "", err
		}
	}
	obj, err := toLua(L, object)
	if err != nil {
		return "", "", err
	}
	L.SetGlobal("obj", obj)
	L.Push(L.NewFunctionFromProto(proto))
	if err := L.PCall(0, 1, nil); err != nil {
		return "", "", err
	}
	hs, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return "", "", fmt.Errorf("returned %s, not a table", L.Get(-1).Type())
	}
	st, ok := hs.RawGetString("status").(lua.LString)
	if !ok || !argoStatuses[string(st)] {
		return "", "", fmt.Errorf("returned status %s, not one of Healthy, Progressing, Degraded, Suspended, Missing, Unknown",
			hs.RawGetString("status"))
	}
	var msg string
	switch m := hs.RawGetString("message").(type) {
	case lua.LString:
		msg = string(m)
	case *lua.LNilType:
	default:
		return "", "", fmt.Errorf("returned message of type %s, not a string", m.Type())
	}
	return string(st), msg, nil
}

// toLua turns a decoded JSON value into Lua values as Argo CD hands objects to
// its scripts: objects and arrays become tables (arrays indexed from 1), null
// becomes nil, so an absent field and a null one look the same.
func toLua(L *lua.LState, v any) (lua.LValue, error) {
	switch v := v.(type) {
	case nil:
		return lua.LNil, nil
	case bool:
		return lua.LBool(v), nil
	case string:
		return lua.LString(v), nil
	case int64:
		return lua.LNumber(v), nil
	case float64:
		return lua.LNumber(v), nil
	case map[string]any:
		t := L.CreateTable(0, len(v))
		for k, e := range v {
			lv, err := toLua(L, e)
			if err != nil {
				return nil, err
			}
			t.RawSetString(k, lv)
		}
		return t, nil
	case []any:
		t := L.CreateTable(len(v), 0)
		for i, e := range v {
			lv, err := toLua(L, e)
			if err != nil {
				return nil, err
			}
			t.RawSetInt(i+1, lv)
		}
		return t, nil
	default:
		return nil, fmt.Errorf("cannot hand a %T to Lua", v)
	}
}
