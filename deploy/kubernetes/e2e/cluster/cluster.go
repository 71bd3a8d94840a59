//go:build linux

package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Names of what build.sh puts in the bin directory.
const (
	APIServerBinary         = "kube-apiserver"
	SchedulerBinary         = "kube-scheduler"
	ControllerManagerBinary = "kube-controller-manager"
	SandboxControllerBinary = "agent-sandbox-controller"
	// SandboxCRDDir holds the agent-sandbox CRD manifests copied from the
	// sigs.k8s.io/agent-sandbox module.
	SandboxCRDDir = "agent-sandbox-crds"
)

// How long each stage of start-up may take. The API server is the slow one:
// on two cores it spends most of ten seconds installing its post-start hooks.
const (
	etcdTimeout      = 30 * time.Second
	apiServerTimeout = 2 * time.Minute
	componentTimeout = time.Minute
	crdTimeout       = time.Minute
)

// etcdPackage is the Debian package that provides the etcd binary.
const etcdPackage = "etcd-server"

// Config says where New finds its binaries and puts its files.
type Config struct {
	// BinDir is the output directory of build.sh.
	BinDir string
	// Dir receives etcd's data, certificates, kubeconfigs and logs. It must
	// exist and should be empty.
	Dir string
	// Etcd is the etcd binary; empty means "etcd" found in PATH.
	Etcd string
	// Logf, if set, receives a line as each stage of start-up completes.
	Logf func(format string, args ...any)
}

// Cluster is a running single-machine control plane: etcd, kube-apiserver,
// kube-scheduler, kube-controller-manager and the agent-sandbox controller,
// all listening on 127.0.0.1 only. It has no nodes, so pods are created and
// scheduled (or found unschedulable) but never run.
type Cluster struct {
	// Dir is Config.Dir; LogDir holds one <component>.log per component.
	Dir    string
	LogDir string
	// Server is the API server URL, https://127.0.0.1:<port>.
	Server string
	// KubeconfigPath is a cluster-admin (system:masters) kubeconfig.
	KubeconfigPath string
	// CACertPath is the cluster CA, which signs the serving and client
	// certificates and, through the controller manager, approved CSRs.
	CACertPath string
	// RESTConfig and Clientset authenticate as cluster-admin.
	RESTConfig *rest.Config
	Clientset  *kubernetes.Clientset

	pki      *pki
	procs    []*process // in start order
	stopOnce sync.Once
	stopErr  error
}

// BinDir is where build.sh puts the binaries by default, the module's
// bin directory, or $SMOLVM_K8S_BIN.
func BinDir() string {
	if dir := os.Getenv("SMOLVM_K8S_BIN"); dir != "" {
		return dir
	}
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "bin")
}

// Start starts a control plane for the test from the binaries in binDir,
// stops it when the test ends, and on failure logs the tail of every
// component's log. ctx bounds start-up only.
func Start(ctx context.Context, t testing.TB, binDir string) *Cluster {
	t.Helper()
	dir := t.TempDir()
	c, err := New(ctx, Config{BinDir: binDir, Dir: dir, Logf: t.Logf})
	if err != nil {
		logTails(t, filepath.Join(dir, "logs"))
		t.Fatalf("starting control plane: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			logTails(t, c.LogDir)
		}
		if err := c.Stop(); err != nil {
			t.Errorf("stopping control plane: %v", err)
		}
	})
	return c
}

// logTails logs the end of every component log in logDir.
func logTails(t testing.TB, logDir string) {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(logDir, "*.log"))
	for _, l := range logs {
		t.Logf("--- last lines of %s ---\n%s", l, tailFile(l, 60))
	}
}

// CheckBinDir reports whether binDir has everything build.sh produces.
func CheckBinDir(binDir string) error {
	var missing []string
	for _, name := range []string{APIServerBinary, SchedulerBinary, ControllerManagerBinary, SandboxControllerBinary} {
		if st, err := os.Stat(filepath.Join(binDir, name)); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			missing = append(missing, name)
		}
	}
	if crds, _ := filepath.Glob(filepath.Join(binDir, SandboxCRDDir, "*.yaml")); len(crds) == 0 {
		missing = append(missing, SandboxCRDDir+"/*.yaml")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s lacks %s; build them with deploy/kubernetes/e2e/build.sh %s",
			binDir, strings.Join(missing, ", "), binDir)
	}
	return nil
}

// New starts a control plane as described by cfg. On error, everything it
// started is stopped again; the logs stay in cfg.Dir.
func New(ctx context.Context, cfg Config) (_ *Cluster, err error) {
	if err := CheckBinDir(cfg.BinDir); err != nil {
		return nil, err
	}
	etcd := cfg.Etcd
	if etcd == "" {
		if etcd, err = exec.LookPath("etcd"); err != nil {
			return nil, fmt.Errorf("etcd not found in PATH; install Debian's %s package (apt-get install %s): %w",
				etcdPackage, etcdPackage, err)
		}
	}
	logf := cfg.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}

	c := &Cluster{Dir: cfg.Dir, LogDir: filepath.Join(cfg.Dir, "logs")}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Stop())
		}
	}()
	if err := os.MkdirAll(c.LogDir, 0o755); err != nil {
		return nil, fmt.Errorf("creating log dir: %w", err)
	}
	pki, err := newPKI(filepath.Join(cfg.Dir, "pki"))
	if err != nil {
		return nil, fmt.Errorf("generating certificates: %w", err)
	}
	c.CACertPath = pki.CA.CertPath
	c.pki = pki

	ports, err := freePorts(6)
	if err != nil {
		return nil, err
	}
	etcdClientPort, etcdPeerPort, apiPort, schedulerPort, controllerPort, sandboxProbePort :=
		ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClientPort)
	etcdPeerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeerPort)
	c.Server = "https://127.0.0.1:" + strconv.Itoa(apiPort)

	// etcd speaks plain HTTP: it listens on loopback only and holds nothing
	// but throwaway test state.
	etcdProc, err := c.start("etcd", etcd,
		"--name=default",
		"--data-dir="+filepath.Join(cfg.Dir, "etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+etcdPeerURL,
		"--initial-advertise-peer-urls="+etcdPeerURL,
		"--initial-cluster=default="+etcdPeerURL,
		"--initial-cluster-state=new",
		"--logger=zap",
		"--log-outputs=stderr",
	)
	if err != nil {
		return nil, err
	}
	plainHTTP := &http.Client{Transport: &http.Transport{}} // no proxy: loopback only
	defer plainHTTP.CloseIdleConnections()
	if err := waitFor(ctx, "etcd to be healthy", etcdTimeout, []*process{etcdProc}, func(ctx context.Context) error {
		body, err := httpGet(ctx, plainHTTP, etcdURL+"/health")
		if err != nil {
			return err
		}
		if !strings.Contains(body, `"health":"true"`) {
			return fmt.Errorf("etcd health: %s", body)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	logf("etcd is healthy at %s", etcdURL)

	apiProc, err := c.start("kube-apiserver", filepath.Join(cfg.BinDir, APIServerBinary),
		"--advertise-address=127.0.0.1",
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(apiPort),
		"--etcd-servers="+etcdURL,
		"--cert-dir="+filepath.Join(cfg.Dir, "apiserver"),
		"--tls-cert-file="+pki.Serving.CertPath,
		"--tls-private-key-file="+pki.Serving.KeyPath,
		"--client-ca-file="+pki.CA.CertPath,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki.ServiceAccountPubPath,
		"--service-account-signing-key-file="+pki.ServiceAccountKeyPath,
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		// Nodes' kubelet APIs (exec, logs, port-forward) are reached at
		// their InternalIP with this client certificate.
		"--kubelet-client-certificate="+pki.KubeletClient.CertPath,
		"--kubelet-client-key="+pki.KubeletClient.KeyPath,
		"--kubelet-preferred-address-types=InternalIP",
		// With a loopback advertise address the "kubernetes" Service's
		// endpoints would be invalid; nothing in the cluster needs them.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--requestheader-client-ca-file="+pki.FrontProxyCA.CertPath,
		"--requestheader-allowed-names="+frontProxyClientUser,
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file="+pki.FrontProxy.CertPath,
		"--proxy-client-key-file="+pki.FrontProxy.KeyPath,
		"--profiling=false",
		"--v=2",
	)
	if err != nil {
		return nil, err
	}

	kubeconfigs := filepath.Join(cfg.Dir, "kubeconfig")
	if err := os.MkdirAll(kubeconfigs, 0o700); err != nil {
		return nil, fmt.Errorf("creating kubeconfig dir: %w", err)
	}
	c.KubeconfigPath = filepath.Join(kubeconfigs, "admin.kubeconfig")
	schedulerKubeconfig := filepath.Join(kubeconfigs, "kube-scheduler.kubeconfig")
	controllerKubeconfig := filepath.Join(kubeconfigs, "kube-controller-manager.kubeconfig")
	for path, kp := range map[string]*keyPair{
		c.KubeconfigPath:     pki.Admin,
		schedulerKubeconfig:  pki.Scheduler,
		controllerKubeconfig: pki.Controller,
	} {
		if err := writeKubeconfig(path, c.Server, pki.CA.CertPEM, kp); err != nil {
			return nil, err
		}
	}
	if c.RESTConfig, err = clientcmd.BuildConfigFromFlags("", c.KubeconfigPath); err != nil {
		return nil, fmt.Errorf("loading admin kubeconfig: %w", err)
	}
	if c.Clientset, err = kubernetes.NewForConfig(c.RESTConfig); err != nil {
		return nil, fmt.Errorf("creating clientset: %w", err)
	}

	if err := waitFor(ctx, "kube-apiserver /readyz", apiServerTimeout, []*process{etcdProc, apiProc}, func(ctx context.Context) error {
		_, err := c.Clientset.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return nil, err
	}
	logf("kube-apiserver is ready at %s", c.Server)

	servingFlags := func(port int) []string {
		return []string{
			"--bind-address=127.0.0.1",
			"--secure-port=" + strconv.Itoa(port),
			"--tls-cert-file=" + pki.Serving.CertPath,
			"--tls-private-key-file=" + pki.Serving.KeyPath,
		}
	}
	clientFlags := func(kubeconfig string) []string {
		return []string{
			"--kubeconfig=" + kubeconfig,
			"--authentication-kubeconfig=" + kubeconfig,
			"--authorization-kubeconfig=" + kubeconfig,
			"--leader-elect=false",
			"--v=2",
		}
	}
	schedProc, err := c.start("kube-scheduler", filepath.Join(cfg.BinDir, SchedulerBinary),
		slices.Concat(clientFlags(schedulerKubeconfig), servingFlags(schedulerPort))...)
	if err != nil {
		return nil, err
	}
	ctrlProc, err := c.start("kube-controller-manager", filepath.Join(cfg.BinDir, ControllerManagerBinary),
		slices.Concat(clientFlags(controllerKubeconfig), servingFlags(controllerPort), []string{
			"--controllers=*",
			"--use-service-account-credentials=true",
			"--service-account-private-key-file=" + pki.ServiceAccountKeyPath,
			"--root-ca-file=" + pki.CA.CertPath,
			"--cluster-signing-cert-file=" + pki.CA.CertPath,
			"--cluster-signing-key-file=" + pki.CA.KeyPath,
		})...)
	if err != nil {
		return nil, err
	}

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pki.CA.CertPEM)
	tlsHTTP := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer tlsHTTP.CloseIdleConnections()
	for _, comp := range []struct {
		proc *process
		port int
	}{{schedProc, schedulerPort}, {ctrlProc, controllerPort}} {
		url := "https://127.0.0.1:" + strconv.Itoa(comp.port) + "/healthz"
		if err := waitFor(ctx, comp.proc.name+" /healthz", componentTimeout, []*process{apiProc, comp.proc}, func(ctx context.Context) error {
			_, err := httpGet(ctx, tlsHTTP, url)
			return err
		}); err != nil {
			return nil, err
		}
		logf("%s is healthy", comp.proc.name)
	}

	crds, err := readCRDs(filepath.Join(cfg.BinDir, SandboxCRDDir))
	if err != nil {
		return nil, err
	}
	extClient, err := apiextensionsclient.NewForConfig(c.RESTConfig)
	if err != nil {
		return nil, fmt.Errorf("creating apiextensions client: %w", err)
	}
	if err := applyCRDs(ctx, extClient, crds); err != nil {
		return nil, err
	}
	if err := waitFor(ctx, "agent-sandbox CRDs to be established", crdTimeout, []*process{apiProc}, func(ctx context.Context) error {
		return crdsEstablished(ctx, extClient, crds)
	}); err != nil {
		return nil, err
	}
	logf("agent-sandbox CRDs are established")

	// The controller runs as cluster-admin: this harness tests what it does,
	// not the RBAC its deployment manifests grant it.
	probeAddr := "127.0.0.1:" + strconv.Itoa(sandboxProbePort)
	sandboxProc, err := c.start("agent-sandbox-controller", filepath.Join(cfg.BinDir, SandboxControllerBinary),
		"--kubeconfig="+c.KubeconfigPath,
		"--enable-webhook=false",
		"--leader-elect=false",
		"--extensions=true",
		"--metrics-bind-address=0",
		"--health-probe-bind-address="+probeAddr,
	)
	if err != nil {
		return nil, err
	}
	if err := waitFor(ctx, "agent-sandbox-controller /readyz", componentTimeout, []*process{apiProc, sandboxProc}, func(ctx context.Context) error {
		_, err := httpGet(ctx, plainHTTP, "http://"+probeAddr+"/readyz")
		return err
	}); err != nil {
		return nil, err
	}
	logf("agent-sandbox-controller is ready")
	return c, nil
}

// start starts a component and records it for Stop.
func (c *Cluster) start(name, bin string, args ...string) (*process, error) {
	p, err := startProcess(name, c.LogDir, bin, args)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	return p, nil
}

// Stop stops every component, last started first, and waits for each to
// exit. It is safe to call more than once.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		for _, p := range slices.Backward(c.procs) {
			errs = append(errs, p.stop())
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// httpGet returns the body of a 200 response to GET url.
func httpGet(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", fmt.Errorf("reading %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
	}
	return string(body), nil
}

// NodeKubeconfig writes a kubeconfig for node name, authenticating as
// system:node:<name>, and returns its path.
func (c *Cluster) NodeKubeconfig(name string) (string, error) {
	kp, err := c.pki.nodeClient(filepath.Join(c.Dir, "pki"), name)
	if err != nil {
		return "", fmt.Errorf("issuing node %s's certificate: %w", name, err)
	}
	path := filepath.Join(c.Dir, "kubeconfig", "node-"+name+".kubeconfig")
	if err := writeKubeconfig(path, c.Server, c.pki.CA.CertPEM, kp); err != nil {
		return "", err
	}
	return path, nil
}

// writeKubeconfig writes a kubeconfig for server that authenticates with
// the client certificate kp and embeds everything, so the file stands alone.
func writeKubeconfig(path, server string, caPEM []byte, kp *keyPair) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos["local"] = &clientcmdapi.AuthInfo{ClientCertificateData: kp.CertPEM, ClientKeyData: kp.KeyPEM}
	cfg.Contexts["local"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: "local"}
	cfg.CurrentContext = "local"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("writing kubeconfig %s: %w", path, err)
	}
	return nil
}
