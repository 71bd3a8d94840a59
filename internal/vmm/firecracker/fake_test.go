package firecracker

// A fake Firecracker for the tests: the test binary runs as one when
// fakeEnv is set (TestMain). It takes Firecracker's command line, serves
// its API on the --api-sock Unix socket, checks every request against the
// API as Firecracker 1.17's swagger document defines it (encoded below by
// hand: methods, paths, fields, types, enums, bounds, required fields, no
// unknown fields) and against the order Firecracker enforces (pre-boot
// only, post-boot only, a snapshot load only on a fresh process, a
// snapshot only while paused), does what Firecracker does with the files
// it is given (opens the kernel, the drives, /dev/kvm; binds the vsock
// socket; attaches to the TAP device; writes and reads snapshots), and
// records each request and what it saw to the file named by fakeLogEnv.
// It answers as Firecracker does: 204, or 400 with {"fault_message"}.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	fakeEnv     = "SMOLVM_TEST_FAKE_FIRECRACKER" // "1": this binary is a fake Firecracker
	fakeLogEnv  = "SMOLVM_TEST_FAKE_FC_LOG"      // the file it appends its records to
	fakeFailEnv = "SMOLVM_TEST_FAKE_FC_FAIL"     // "METHOD /path": answer that request 400
	fakeSeeEnv  = "SMOLVM_TEST_FAKE_FC_SEE"      // host paths, ":"-separated, it tries to open
	fakeVersion = "v1.17.0-dev"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && slices.Contains(Subcommands, os.Args[1]) {
		if err := Main(os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if os.Getenv(fakeEnv) == "1" {
		os.Exit(fakeMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// ---- The API, from firecracker-api-1.17.0-dev.yaml ----

type kind int

const (
	kString kind = iota
	kBool
	kInt
	kObject
	kArray
)

// prop is one property of a definition.
type prop struct {
	kind     kind
	required bool
	enum     []string
	foldCase bool // the enum is matched ignoring case (Logger.level)
	min, max *int64
	obj      schema // kObject: its properties
	freeForm bool   // kObject: any string values (additionalProperties)
	items    *prop  // kArray
}

type schema map[string]prop

func bound(v int64) *int64 { return &v }

var (
	str    = prop{kind: kString}
	strReq = prop{kind: kString, required: true}
	boolP  = prop{kind: kBool}

	tokenBucket = schema{
		"one_time_burst": {kind: kInt, min: bound(0)},
		"refill_time":    {kind: kInt, required: true, min: bound(0)},
		"size":           {kind: kInt, required: true, min: bound(0)},
	}
	rateLimiter = schema{
		"bandwidth": {kind: kObject, obj: tokenBucket},
		"ops":       {kind: kObject, obj: tokenBucket},
	}
	bootSourceDef = schema{
		"boot_args":         str,
		"initrd_path":       str,
		"kernel_image_path": strReq,
	}
	driveDef = schema{
		"drive_id":       strReq,
		"partuuid":       str,
		"is_root_device": {kind: kBool, required: true},
		"cache_type":     {kind: kString, enum: []string{"Unsafe", "Writeback"}},
		"is_read_only":   boolP,
		"path_on_host":   str,
		"rate_limiter":   {kind: kObject, obj: rateLimiter},
		"io_engine":      {kind: kString, enum: []string{"Sync", "Async"}},
		"socket":         str,
	}
	partialDriveDef = schema{
		"drive_id":     strReq,
		"path_on_host": str,
		"rate_limiter": {kind: kObject, obj: rateLimiter},
	}
	machineConfigDef = schema{
		"cpu_template":      {kind: kString, enum: []string{"C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"}},
		"smt":               boolP,
		"mem_size_mib":      {kind: kInt, required: true},
		"track_dirty_pages": boolP,
		"vcpu_count":        {kind: kInt, required: true, min: bound(1), max: bound(32)},
		"huge_pages":        {kind: kString, enum: []string{"None", "Transparent", "2M"}},
	}
	vsockDef = schema{
		"guest_cid": {kind: kInt, required: true, min: bound(3)},
		"uds_path":  strReq,
		"vsock_id":  str,
	}
	loggerDef = schema{
		"level":           {kind: kString, enum: []string{"Error", "Warning", "Info", "Debug", "Trace", "Off"}, foldCase: true},
		"log_path":        str,
		"show_level":      boolP,
		"show_log_origin": boolP,
		"module":          str,
	}
	metricsDef = schema{
		"metrics_path": strReq,
		"emit_id":      boolP,
		"properties":   {kind: kObject, freeForm: true},
	}
	networkInterfaceDef = schema{
		"guest_mac":       str,
		"host_dev_name":   strReq,
		"iface_id":        strReq,
		"mtu":             {kind: kInt, min: bound(68), max: bound(65535)},
		"rx_rate_limiter": {kind: kObject, obj: rateLimiter},
		"tx_rate_limiter": {kind: kObject, obj: rateLimiter},
	}
	actionDef = schema{
		"action_type": {kind: kString, required: true, enum: []string{"FlushMetrics", "InstanceStart", "SendCtrlAltDel"}},
	}
	vmDef = schema{
		"state": {kind: kString, required: true, enum: []string{"Paused", "Resumed"}},
	}
	snapshotCreateDef = schema{
		"mem_file_path": strReq,
		"snapshot_path": strReq,
		"snapshot_type": {kind: kString, enum: []string{"Full", "Diff"}},
	}
	memoryBackendDef = schema{
		"backend_type": {kind: kString, required: true, enum: []string{"File", "Uffd"}},
		"backend_path": strReq,
	}
	snapshotLoadDef = schema{
		"enable_diff_snapshots": boolP,
		"track_dirty_pages":     boolP,
		"mem_file_path":         str,
		"mem_backend":           {kind: kObject, obj: memoryBackendDef},
		"snapshot_path":         strReq,
		"resume_vm":             boolP,
		"network_overrides": {kind: kArray, items: &prop{kind: kObject, obj: schema{
			"iface_id":      strReq,
			"host_dev_name": strReq,
		}}},
		"vsock_override": {kind: kObject, obj: schema{"uds_path": strReq}},
		"clock_realtime": boolP,
		"huge_pages":     {kind: kString, enum: []string{"Snapshot", "None", "Transparent", "2M"}},
	}
)

// route is one operation; {} in a pattern is a path parameter.
type route struct {
	method, pattern string
	body            schema // nil: no body
}

var routes = []route{
	{"GET", "/", nil},
	{"GET", "/version", nil},
	{"GET", "/machine-config", nil},
	{"PUT", "/actions", actionDef},
	{"PUT", "/boot-source", bootSourceDef},
	{"PUT", "/drives/{}", driveDef},
	{"PATCH", "/drives/{}", partialDriveDef},
	{"PUT", "/logger", loggerDef},
	{"PUT", "/machine-config", machineConfigDef},
	{"PATCH", "/machine-config", machineConfigDef},
	{"PUT", "/metrics", metricsDef},
	{"PUT", "/network-interfaces/{}", networkInterfaceDef},
	{"PUT", "/snapshot/create", snapshotCreateDef},
	{"PUT", "/snapshot/load", snapshotLoadDef},
	{"PATCH", "/vm", vmDef},
	{"PUT", "/vsock", vsockDef},
}

// match finds the route of a request and its path parameter.
func match(method, path string) (route, string, bool) {
	for _, r := range routes {
		if r.method != method {
			continue
		}
		if prefix, ok := strings.CutSuffix(r.pattern, "{}"); ok {
			if p, ok := strings.CutPrefix(path, prefix); ok && p != "" && !strings.Contains(p, "/") {
				return r, p, true
			}
			continue
		}
		if r.pattern == path {
			return r, "", true
		}
	}
	return route{}, "", false
}

// validate checks a JSON body against a definition.
func validate(raw []byte, s schema, where string) error {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil || m == nil {
		return fmt.Errorf("%s: not a JSON object: %s", where, raw)
	}
	for k, v := range m {
		p, ok := s[k]
		if !ok {
			return fmt.Errorf("%s: unknown field `%s`", where, k)
		}
		if err := checkValue(v, p, where+"."+k); err != nil {
			return err
		}
	}
	for k, p := range s {
		if _, ok := m[k]; p.required && !ok {
			return fmt.Errorf("%s: missing field `%s`", where, k)
		}
	}
	return nil
}

func checkValue(v json.RawMessage, p prop, where string) error {
	if bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
		return fmt.Errorf("%s: null", where)
	}
	switch p.kind {
	case kString:
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return fmt.Errorf("%s: not a string: %s", where, v)
		}
		if p.enum != nil && !slices.ContainsFunc(p.enum, func(e string) bool {
			return e == s || p.foldCase && strings.EqualFold(e, s)
		}) {
			return fmt.Errorf("%s: unknown variant `%s`, expected one of %v", where, s, p.enum)
		}
	case kBool:
		var b bool
		if err := json.Unmarshal(v, &b); err != nil {
			return fmt.Errorf("%s: not a boolean: %s", where, v)
		}
	case kInt:
		d := json.NewDecoder(bytes.NewReader(v))
		d.UseNumber()
		var x any
		err := d.Decode(&x)
		n, ok := x.(json.Number)
		if err != nil || !ok {
			return fmt.Errorf("%s: not a number: %s", where, v)
		}
		i, err := n.Int64()
		if err != nil {
			return fmt.Errorf("%s: not an integer: %s", where, v)
		}
		if p.min != nil && i < *p.min || p.max != nil && i > *p.max {
			return fmt.Errorf("%s: %d out of range", where, i)
		}
	case kObject:
		if p.freeForm {
			var m map[string]string
			if err := json.Unmarshal(v, &m); err != nil {
				return fmt.Errorf("%s: not an object of strings: %s", where, v)
			}
			return nil
		}
		return validate(v, p.obj, where)
	case kArray:
		var items []json.RawMessage
		if err := json.Unmarshal(v, &items); err != nil {
			return fmt.Errorf("%s: not an array: %s", where, v)
		}
		for i, it := range items {
			if err := checkValue(it, *p.items, where+"["+strconv.Itoa(i)+"]"); err != nil {
				return err
			}
		}
	}
	return nil
}

// ---- The fake process ----

// record is one line of the fake's log.
type record struct {
	PID    int             `json:"pid"`
	Kind   string          `json:"kind"` // "request" or "event"
	Method string          `json:"method,omitempty"`
	Path   string          `json:"path,omitempty"`
	Body   json.RawMessage `json:"body,omitempty"`
	Status int             `json:"status,omitempty"`
	Fault  string          `json:"fault,omitempty"`
	What   string          `json:"what,omitempty"`
	Data   map[string]any  `json:"data,omitempty"`
}

// fakeSnapshot is what the fake writes as a VM's state: what Firecracker
// records of the devices, by the paths it was given.
type fakeSnapshot struct {
	Fake       string             `json:"fake"`
	MemSizeMiB int                `json:"mem_size_mib"`
	VCPUs      int                `json:"vcpu_count"`
	Drives     []drive            `json:"drives"`
	Vsock      vsockConfig        `json:"vsock"`
	Nets       []networkInterface `json:"network_interfaces"`
}

type fakeVM struct {
	mu   sync.Mutex
	id   string
	log  *os.File
	fail string

	state      string          // "Not started", "Running", "Paused"
	configured map[string]bool // what was set up, by route
	metricsSet bool
	mem, vcpus int
	drives     []drive
	vsock      *vsockConfig
	nets       []networkInterface
	taps       map[string]*os.File
}

func (f *fakeVM) record(r record) {
	r.PID = os.Getpid()
	b, _ := json.Marshal(r)
	f.log.Write(append(b, '\n'))
}

func (f *fakeVM) event(what string, data map[string]any) {
	f.record(record{Kind: "event", What: what, Data: data})
}

var fakeIDRE = regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`)

func fakeMain(args []string) int {
	var sock, id string
	id = "anonymous-instance"
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--version":
			fmt.Printf("Firecracker %s\n\nSupported snapshot data format versions: 8.0.0\n", fakeVersion)
			return 0
		case (a == "--api-sock" || a == "--id") && i+1 < len(args):
			if a == "--api-sock" {
				sock = args[i+1]
			} else {
				id = args[i+1]
			}
			i++
		default:
			fmt.Fprintf(os.Stderr, "fake firecracker: unexpected argument %q\n", a)
			return 2
		}
	}
	if sock == "" || !fakeIDRE.MatchString(id) {
		fmt.Fprintf(os.Stderr, "fake firecracker: want --api-sock PATH and a valid --id (got %q)\n", id)
		return 2
	}
	logf, err := os.OpenFile(os.Getenv(fakeLogEnv), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake firecracker:", err)
		return 1
	}
	f := &fakeVM{id: id, log: logf, fail: os.Getenv(fakeFailEnv), state: "Not started", configured: map[string]bool{}, taps: map[string]*os.File{}}
	f.recordStart()
	// Firecracker refuses a socket that is there already.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake firecracker: Failed to open the API socket:", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	go func() { <-sig; ln.Close(); os.Exit(0) }()
	http.Serve(ln, f)
	return 0
}

// recordStart records what the process runs as, in which namespaces.
func (f *fakeVM) recordStart() {
	status, _ := os.ReadFile("/proc/self/status")
	field := func(name string) string {
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, name+":"); ok {
				return strings.TrimSpace(v)
			}
		}
		return ""
	}
	ns := func(kind string) string { s, _ := os.Readlink("/proc/self/ns/" + kind); return s }
	cg, _ := os.ReadFile("/proc/self/cgroup")
	cwd, _ := os.Getwd()
	// What of the file system it can reach: the names in its root and
	// in its /proc, and what opening each path it was told to try says.
	var root, procs []string
	if ents, err := os.ReadDir("/"); err == nil {
		for _, e := range ents {
			root = append(root, e.Name())
		}
	}
	if ents, err := os.ReadDir("/proc"); err == nil {
		for _, e := range ents {
			if _, err := strconv.Atoi(e.Name()); err == nil {
				procs = append(procs, e.Name())
			}
		}
	}
	opened := map[string]string{}
	for _, p := range strings.Split(os.Getenv(fakeSeeEnv), ":") {
		if p == "" {
			continue
		}
		fh, err := os.Open(p)
		if err != nil {
			opened[p] = err.Error()
			continue
		}
		fh.Close()
		opened[p] = "opened"
	}
	f.event("started", map[string]any{
		"uid": os.Getuid(), "gid": os.Getgid(), "groups": field("Groups"),
		"no_new_privs": field("NoNewPrivs"), "cap_eff": field("CapEff"),
		"mnt_ns": ns("mnt"), "net_ns": ns("net"), "cgroup": string(cg), "cwd": cwd,
		"args": os.Args, "env": os.Environ(),
		"root": root, "procs": procs, "opened": opened,
	})
}

func (f *fakeVM) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	f.mu.Lock()
	status, fault, out := f.handle(req.Method, req.URL.Path, body)
	rec := record{Kind: "request", Method: req.Method, Path: req.URL.Path, Status: status, Fault: fault}
	if len(body) > 0 {
		if json.Valid(body) {
			rec.Body = body
		} else {
			rec.Body, _ = json.Marshal(string(body))
		}
	}
	f.record(rec)
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	switch {
	case status == http.StatusOK:
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(out)
	case status == http.StatusNoContent:
		w.WriteHeader(status)
	default:
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(map[string]string{"fault_message": fault})
	}
}

func bad(format string, a ...any) (int, string, any) {
	return http.StatusBadRequest, fmt.Sprintf(format, a...), nil
}

// preBoot lists what may only be configured before the guest starts.
var preBoot = map[string]bool{
	"PUT /boot-source": true, "PUT /drives/{}": true, "PUT /machine-config": true,
	"PATCH /machine-config": true, "PUT /network-interfaces/{}": true, "PUT /vsock": true,
	"PUT /snapshot/load": true,
}

// postBoot lists what needs a started guest.
var postBoot = map[string]bool{
	"PATCH /vm": true, "PATCH /drives/{}": true, "PUT /snapshot/create": true,
}

func (f *fakeVM) handle(method, path string, body []byte) (int, string, any) {
	r, param, ok := match(method, path)
	if !ok {
		return bad("Invalid request method and/or path: %s %s", method, path)
	}
	op := r.method + " " + r.pattern
	if r.body != nil {
		if len(bytes.TrimSpace(body)) == 0 {
			return bad("%s: the request has no body", op)
		}
		if err := validate(body, r.body, op); err != nil {
			return bad("%v", err)
		}
	}
	if f.fail == method+" "+path {
		return bad("fake: failing %s as asked", f.fail)
	}
	started := f.state != "Not started"
	if preBoot[op] && started {
		return bad("The requested operation is not supported after starting the microVM.")
	}
	if postBoot[op] && !started {
		return bad("The requested operation is not supported before starting the microVM.")
	}
	switch op {
	case "GET /":
		return http.StatusOK, "", map[string]string{"app_name": "Firecracker", "id": f.id, "state": f.state, "vmm_version": strings.TrimPrefix(fakeVersion, "v")}
	case "GET /version":
		return http.StatusOK, "", map[string]string{"firecracker_version": strings.TrimPrefix(fakeVersion, "v")}
	case "GET /machine-config":
		return http.StatusOK, "", map[string]int{"vcpu_count": f.vcpus, "mem_size_mib": f.mem}
	case "PUT /logger":
		var l logger
		json.Unmarshal(body, &l)
		if l.LogPath != "" {
			lf, err := os.OpenFile(l.LogPath, os.O_RDWR|os.O_CREATE, 0o600)
			if err != nil {
				return bad("Failed to open the logger file: %v", err)
			}
			lf.Close()
		}
	case "PUT /metrics":
		if f.metricsSet {
			return bad("Reinitialization of metrics not allowed.")
		}
		var m metrics
		json.Unmarshal(body, &m)
		mf, err := os.OpenFile(m.MetricsPath, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return bad("Failed to open the metrics file: %v", err)
		}
		mf.Close()
		f.metricsSet = true
	case "PUT /boot-source":
		var b bootSource
		json.Unmarshal(body, &b)
		for _, p := range []string{b.KernelImagePath, b.InitrdPath} {
			if p == "" {
				continue
			}
			// Firecracker opens both at once.
			kf, err := os.Open(p)
			if err != nil {
				return bad("Cannot open the kernel or initrd image: %v", err)
			}
			kf.Close()
		}
	case "PUT /drives/{}":
		var dr drive
		json.Unmarshal(body, &dr)
		if dr.DriveID != param {
			return bad("The id from the path [%s] does not match the id from the body [%s]!", param, dr.DriveID)
		}
		flag := os.O_RDWR
		if dr.IsReadOnly {
			flag = os.O_RDONLY
		}
		df, err := os.OpenFile(dr.PathOnHost, flag, 0)
		if err != nil {
			return bad("Unable to create the block device: %v", err)
		}
		df.Close()
		f.drives = slices.DeleteFunc(f.drives, func(d drive) bool { return d.DriveID == dr.DriveID })
		f.drives = append(f.drives, dr)
	case "PATCH /drives/{}":
		var pd partialDrive
		json.Unmarshal(body, &pd)
		i := slices.IndexFunc(f.drives, func(d drive) bool { return d.DriveID == pd.DriveID })
		if pd.DriveID != param || i < 0 {
			return bad("Drive %s not found", param)
		}
		if pd.PathOnHost != "" {
			st, err := os.Stat(pd.PathOnHost)
			if err != nil {
				return bad("Unable to patch the block device: %v", err)
			}
			f.drives[i].PathOnHost = pd.PathOnHost
			f.event("drive-size", map[string]any{"drive": pd.DriveID, "bytes": st.Size()})
		}
	case "PUT /machine-config", "PATCH /machine-config":
		var mc machineConfig
		json.Unmarshal(body, &mc)
		f.mem, f.vcpus = mc.MemSizeMiB, mc.VCPUCount
	case "PUT /vsock":
		var v vsockConfig
		json.Unmarshal(body, &v)
		if err := f.bindVsock(v.UDSPath); err != nil {
			return bad("Cannot create backend for vsock device: %v", err)
		}
		f.vsock = &v
	case "PUT /network-interfaces/{}":
		var ni networkInterface
		json.Unmarshal(body, &ni)
		if ni.IfaceID != param {
			return bad("The id from the path [%s] does not match the id from the body [%s]!", param, ni.IfaceID)
		}
		if err := f.attachTap(ni); err != nil {
			return bad("Could not create the network device: %v", err)
		}
		f.nets = append(f.nets, ni)
	case "PUT /actions":
		var a action
		json.Unmarshal(body, &a)
		if a.ActionType == "SendCtrlAltDel" && f.state == "Running" {
			// The guest reboots, which ends Firecracker.
			go func() { time.Sleep(50 * time.Millisecond); os.Exit(0) }()
		}
		if a.ActionType != "InstanceStart" {
			return http.StatusNoContent, "", nil
		}
		if !f.configured["PUT /boot-source"] {
			return bad("Cannot start microvm without kernel configuration.")
		}
		if err := f.useKVM(); err != nil {
			return bad("%v", err)
		}
		f.run()
	case "PATCH /vm":
		var v vmState
		json.Unmarshal(body, &v)
		if v.State == "Paused" {
			f.state = "Paused"
		} else {
			f.state = "Running"
		}
	case "PUT /snapshot/create":
		if f.state != "Paused" {
			return bad("Cannot save the microVM state: the microVM must be paused.")
		}
		var sc snapshotCreate
		json.Unmarshal(body, &sc)
		if err := f.saveSnapshot(sc); err != nil {
			return bad("Cannot save the microVM state: %v", err)
		}
	case "PUT /snapshot/load":
		var raw map[string]json.RawMessage
		json.Unmarshal(body, &raw)
		_, hasFile := raw["mem_file_path"]
		_, hasBackend := raw["mem_backend"]
		if hasFile == hasBackend {
			return bad("Exactly one of mem_file_path and mem_backend must be given.")
		}
		for c := range f.configured {
			if c != "PUT /logger" && c != "PUT /metrics" {
				return bad("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
			}
		}
		var sl snapshotLoad
		json.Unmarshal(body, &sl)
		if err := f.loadSnapshot(sl); err != nil {
			return bad("Load snapshot error: %v", err)
		}
	}
	f.configured[op] = true
	return http.StatusNoContent, "", nil
}

// useKVM opens /dev/kvm as Firecracker must, where the host has one.
func (f *fakeVM) useKVM() error {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return nil
	}
	k, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("Error creating KVM object: %v", err)
	}
	k.Close()
	return nil
}

// run starts the "guest": it writes to the console, and says hello on
// each NIC.
func (f *fakeVM) run() {
	f.state = "Running"
	fmt.Printf("fake firecracker %d: the guest runs\n", os.Getpid())
	for _, n := range f.nets {
		mac, _ := net.ParseMAC(n.GuestMAC)
		frame := append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac...)
		frame = append(frame, 0x88, 0xb5)
		frame = append(frame, "hello from the fake guest "+strconv.Itoa(os.Getpid())...)
		// With the 12-byte virtio-net header Firecracker uses.
		f.taps[n.IfaceID].Write(append(make([]byte, 12), frame...))
	}
}

// bindVsock listens on the hybrid vsock's socket and answers CONNECT as
// Firecracker does: "OK <port>" and then the guest's stream (an echo,
// here) when the guest runs and listens on the port (the agent's), else
// it closes the connection.
func (f *fakeVM) bindVsock(path string) error {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	next := uint32(1 << 30)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var line []byte
				b := make([]byte, 1)
				for len(line) < 32 {
					if _, err := c.Read(b); err != nil {
						return
					}
					if b[0] == '\n' {
						break
					}
					line = append(line, b[0])
				}
				port, ok := strings.CutPrefix(string(line), "CONNECT ")
				f.mu.Lock()
				running := f.state == "Running"
				next++
				local := next
				f.mu.Unlock()
				if !ok || !running || port != "1024" {
					return
				}
				fmt.Fprintf(c, "OK %d\n", local)
				io.Copy(c, c)
			}()
		}
	}()
	return nil
}

// attachTap opens the TAP device as Firecracker does, and records every
// frame that reaches the guest.
func (f *fakeVM) attachTap(ni networkInterface) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, _ := unix.NewIfreq(ni.HostDevName)
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return fmt.Errorf("TUNSETIFF %s: %w", ni.HostDevName, err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, 12); err != nil {
		unix.Close(fd)
		return fmt.Errorf("TUNSETVNETHDRSZ: %w", err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunFCsum|tunFTSO4|tunFTSO6); err != nil {
		unix.Close(fd)
		return fmt.Errorf("TUNSETOFFLOAD: %w", err)
	}
	tap := os.NewFile(uintptr(fd), ni.HostDevName)
	f.taps[ni.IfaceID] = tap
	go func() {
		buf := make([]byte, 12+maxFrame)
		for {
			n, err := tap.Read(buf)
			if err != nil {
				return
			}
			if n > 12 {
				f.event("frame-to-guest", map[string]any{"iface": ni.IfaceID, "hex": hex.EncodeToString(buf[12:n])})
			}
		}
	}()
	return nil
}

func (f *fakeVM) saveSnapshot(sc snapshotCreate) error {
	b, _ := json.Marshal(fakeSnapshot{Fake: "firecracker", MemSizeMiB: f.mem, VCPUs: f.vcpus, Drives: f.drives, Vsock: *f.vsock, Nets: f.nets})
	if err := os.WriteFile(sc.SnapshotPath, b, 0o600); err != nil {
		return err
	}
	mf, err := os.OpenFile(sc.MemFilePath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer mf.Close()
	// A page written, the rest a hole, as a lightly used guest's.
	if _, err := mf.WriteAt([]byte("guest memory"), 0); err != nil {
		return err
	}
	return mf.Truncate(int64(f.mem) << 20)
}

// loadSnapshot restores the devices at the paths the snapshot recorded,
// and records which file each drive turned out to be.
func (f *fakeVM) loadSnapshot(sl snapshotLoad) error {
	b, err := os.ReadFile(sl.SnapshotPath)
	if err != nil {
		return err
	}
	var s fakeSnapshot
	if err := json.Unmarshal(b, &s); err != nil || s.Fake != "firecracker" {
		return fmt.Errorf("not a snapshot: %v", err)
	}
	mem, err := os.Open(sl.MemBackend.BackendPath)
	if err != nil {
		return err
	}
	defer mem.Close()
	if st, _ := mem.Stat(); st.Size() != int64(s.MemSizeMiB)<<20 {
		return fmt.Errorf("the memory file is %d bytes, the snapshot's memory %d MiB", st.Size(), s.MemSizeMiB)
	}
	if err := f.useKVM(); err != nil {
		return err
	}
	f.mem, f.vcpus = s.MemSizeMiB, s.VCPUs
	for _, d := range s.Drives {
		df, err := os.OpenFile(d.PathOnHost, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("drive %s: %v", d.DriveID, err)
		}
		var st unix.Stat_t
		unix.Fstat(int(df.Fd()), &st)
		df.Close()
		f.event("restored-drive", map[string]any{"drive": d.DriveID, "path": d.PathOnHost, "dev": st.Dev, "ino": st.Ino})
		f.drives = append(f.drives, d)
	}
	if err := f.bindVsock(s.Vsock.UDSPath); err != nil {
		return fmt.Errorf("vsock: %v", err)
	}
	f.vsock = &s.Vsock
	for _, n := range s.Nets {
		if err := f.attachTap(n); err != nil {
			return fmt.Errorf("net %s: %v", n.IfaceID, err)
		}
		f.nets = append(f.nets, n)
	}
	if sl.ResumeVM {
		f.run()
	} else {
		f.state = "Paused"
	}
	return nil
}

// ---- Reading the fake's records ----

// readRecords reads the fake's log.
func readRecords(t *testing.T, path string) []record {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []record
	for _, l := range bytes.Split(b, []byte("\n")) {
		if len(l) == 0 {
			continue
		}
		var r record
		if err := json.Unmarshal(l, &r); err != nil {
			t.Fatalf("record %q: %v", l, err)
		}
		out = append(out, r)
	}
	return out
}

// requestsOf are the requests process pid got, but the GETs (the driver
// polls GET / until the API answers), as "METHOD /path".
func requestsOf(recs []record, pid int) []record {
	var out []record
	for _, r := range recs {
		if r.PID == pid && r.Kind == "request" && r.Method != "GET" {
			out = append(out, r)
		}
	}
	return out
}

func eventsOf(recs []record, pid int, what string) []record {
	var out []record
	for _, r := range recs {
		if r.PID == pid && r.Kind == "event" && r.What == what {
			out = append(out, r)
		}
	}
	return out
}

func lines(rs []record) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Method+" "+r.Path)
	}
	return out
}

// TAP offloads Firecracker sets (linux/if_tun.h).
const (
	tunFCsum = 0x01
	tunFTSO4 = 0x02
	tunFTSO6 = 0x04
)
