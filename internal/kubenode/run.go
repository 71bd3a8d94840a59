package kubenode

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/procfs"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corev1listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	certutil "k8s.io/client-go/util/cert"

	sapi "github.com/smolvm/smolvm/internal/api"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// Node labels and taint: pods land on smolvm nodes only when they ask to
// (the smolvm RuntimeClass carries the selector and the toleration).
const (
	NodeLabel = "smolvm.dev/node"
	TaintKey  = "smolvm.dev/vm-only"
)

// Config is one node.
type Config struct {
	// Kubeconfig is the file the node reaches the API server with.
	Kubeconfig string
	// Name is the Node's name.
	Name string
	// Address is the node's IP: the kubelet API listens there, and pods'
	// ports are reached there.
	Address string
	// Port is the kubelet API's port (10250 by default).
	Port int
	// CertFile and KeyFile are the kubelet API's serving certificate; a
	// self-signed one for Address is made when they are empty.
	CertFile, KeyFile string
	// ClientCAFile signs the certificates clients of the kubelet API (the
	// API server) present; requests are then authorized by the API server
	// (SubjectAccessReview). Bearer tokens are checked with TokenReview.
	ClientCAFile string
	// MemoryMiB and CPUs are what the node offers; 0 means the host's.
	MemoryMiB, CPUs int
	// Pods is how many pods the node takes; 0 means 110.
	Pods int
	// Version is reported as the kubelet version.
	Version string
	Logger  *slog.Logger
	// Ready, when set, is called once the node is registered and ready.
	Ready func()
}

// Run registers the node and serves its pods from m until ctx ends. The
// sandboxes stay when it returns: a node started again adopts them.
func Run(ctx context.Context, m *sandbox.Manager, c Config) error {
	if c.Name == "" || c.Address == "" {
		return errors.New("a node needs a name and an address")
	}
	ip := net.ParseIP(c.Address)
	if ip == nil {
		return fmt.Errorf("node address %q is not an IP address", c.Address)
	}
	if c.Port == 0 {
		c.Port = 10250
	}
	if c.Pods == 0 {
		c.Pods = 110
	}
	if c.CPUs == 0 {
		c.CPUs = runtime.NumCPU()
	}
	if c.MemoryMiB == 0 {
		total, err := hostMemoryMiB()
		if err != nil {
			return err
		}
		c.MemoryMiB = total
	}
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return fmt.Errorf("reading kubeconfig %s: %w", c.Kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("a client from %s: %w", c.Kubeconfig, err)
	}
	cert, err := servingCert(c, ip)
	if err != nil {
		return err
	}
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, ClientAuth: tls.RequestClientCert}
	if c.ClientCAFile != "" {
		pem, err := os.ReadFile(c.ClientCAFile)
		if err != nil {
			return fmt.Errorf("reading the client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("the client CA %s holds no PEM certificate", c.ClientCAFile)
		}
		tlsConfig.ClientCAs, tlsConfig.ClientAuth = pool, tls.VerifyClientCertIfGiven
	}
	provider, err := NewProvider(ctx, m, c.Name, c.Address, log)
	if err != nil {
		return err
	}
	provider.finished = func(ctx context.Context, pod *corev1.Pod) {
		// Only the pod this node ran: one made again under the same
		// name has another uid.
		now := int64(0)
		err := client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
			GracePeriodSeconds: &now, Preconditions: metav1.NewUIDPreconditions(string(pod.UID)),
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			log.Warn("removing a deleted pod from the API", "pod", podKey(pod.Namespace, pod.Name), "err", err)
		}
	}

	// The pod controller watches only this node's pods; secrets, config
	// maps and services are what environment references resolve from.
	// Informers of these four kinds only: client-go's informer factory
	// would link in every API group's.
	onNode := func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", c.Name).String()
	}
	indexers := cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}
	podInformer := podInformer{coreinformers.NewFilteredPodInformer(client, corev1.NamespaceAll, time.Minute, indexers, onNode)}
	secrets := secretInformer{coreinformers.NewSecretInformer(client, corev1.NamespaceAll, time.Minute, indexers)}
	configMaps := configMapInformer{coreinformers.NewConfigMapInformer(client, corev1.NamespaceAll, time.Minute, indexers)}
	services := serviceInformer{coreinformers.NewServiceInformer(client, corev1.NamespaceAll, time.Minute, indexers)}
	broadcaster := record.NewBroadcaster()
	defer broadcaster.Shutdown()
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events(corev1.NamespaceAll)})
	pc, err := node.NewPodController(node.PodControllerConfig{
		PodClient:         client.CoreV1(),
		PodInformer:       podInformer,
		EventRecorder:     broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "smolvm-node", Host: c.Name}),
		Provider:          provider,
		SecretInformer:    secrets,
		ConfigMapInformer: configMaps,
		ServiceInformer:   services,
	})
	if err != nil {
		return fmt.Errorf("pod controller: %w", err)
	}
	spec := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: c.Name, Labels: map[string]string{
		// Only labels NodeRestriction lets a node set on itself.
		"type": "virtual-kubelet", "kubernetes.io/hostname": c.Name,
	}}}
	describe(spec, c)
	nc, err := node.NewNodeController(provider, spec, client.CoreV1().Nodes(),
		node.WithNodeEnableLeaseV1(client.CoordinationV1().Leases(corev1.NamespaceNodeLease), node.DefaultLeaseDuration))
	if err != nil {
		return fmt.Errorf("node controller: %w", err)
	}

	ln, err := tls.Listen("tcp", net.JoinHostPort(c.Address, strconv.Itoa(c.Port)), tlsConfig)
	if err != nil {
		return fmt.Errorf("kubelet API: %w", err)
	}
	handler := api.PodHandler(api.PodHandlerConfig{
		RunInContainer:    provider.RunInContainer,
		AttachToContainer: provider.AttachToContainer,
		PortForward:       provider.PortForward,
		GetContainerLogs:  provider.GetContainerLogs,
		GetPods:           provider.GetPods,
		GetPodsFromKubernetes: func(context.Context) ([]*corev1.Pod, error) {
			return podInformer.Lister().List(labels.Everything())
		},
		GetStatsSummary:    provider.GetStatsSummary,
		GetMetricsResource: provider.GetMetricsResource,
	}, false)
	// The sandboxes' own API beside the kubelet's, for the gateway; the
	// kubelet's authorizer asks for nodes/proxy, as for exec.
	mux := http.NewServeMux()
	mux.Handle(SandboxAPIPrefix, provider.sandboxAPI(sapi.New(m, sapi.Options{
		Addr:    net.JoinHostPort(c.Address, strconv.Itoa(c.Port)),
		Version: c.Version,
	})))
	mux.Handle("/", handler)
	srv := &http.Server{Handler: authorize(client, c.Name, log, mux), ReadHeaderTimeout: 30 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("kubelet API stopped", "err", err)
		}
	}()
	defer srv.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, inf := range []cache.SharedIndexInformer{podInformer.i, secrets.i, configMaps.i, services.i} {
		go inf.Run(ctx.Done())
	}
	pcDone := make(chan error, 1)
	go func() { pcDone <- pc.Run(ctx, max(runtime.NumCPU(), 4)) }()
	ncDone := make(chan error, 1)
	ready := time.NewTimer(2 * time.Minute)
	defer ready.Stop()
	select {
	case <-pc.Ready():
		go func() { ncDone <- nc.Run(ctx) }()
	case err := <-pcDone:
		return fmt.Errorf("pod controller: %w", err)
	case <-ready.C:
		return fmt.Errorf("node %s: its pods were not listed within 2 minutes (is the API server reachable?)", c.Name)
	case <-ctx.Done():
		return nil
	}
	select {
	case <-nc.Ready():
		log.Info("node ready", "node", c.Name, "address", c.Address, "kubelet_port", c.Port)
		if c.Ready != nil {
			c.Ready()
		}
	case err := <-ncDone:
		return fmt.Errorf("node controller: %w", err)
	case <-ready.C:
		return fmt.Errorf("node %s was not registered within 2 minutes (is the API server reachable?)", c.Name)
	case <-ctx.Done():
	}
	var runErr error
	select {
	case err := <-pcDone:
		runErr = err
	case err := <-ncDone:
		runErr = err
	case <-ctx.Done():
	}
	stopped := ctx.Err() != nil
	cancel()
	<-pc.Done()
	<-nc.Done()
	if stopped {
		return nil
	}
	return runErr
}

// describe fills in the Node object the controller registers.
func describe(n *corev1.Node, c Config) {
	n.Labels[NodeLabel] = "true"
	n.Labels["kubernetes.io/os"] = "linux"
	n.Labels["kubernetes.io/arch"] = runtime.GOARCH
	n.Spec.Taints = []corev1.Taint{{Key: TaintKey, Value: "true", Effect: corev1.TaintEffectNoSchedule}}
	res := corev1.ResourceList{
		corev1.ResourceCPU:    *resource.NewQuantity(int64(c.CPUs), resource.DecimalSI),
		corev1.ResourceMemory: *resource.NewQuantity(int64(c.MemoryMiB)<<20, resource.BinarySI),
		corev1.ResourcePods:   *resource.NewQuantity(int64(c.Pods), resource.DecimalSI),
	}
	n.Status.Capacity, n.Status.Allocatable = res, res.DeepCopy()
	n.Status.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: c.Address},
		{Type: corev1.NodeHostName, Address: c.Name},
	}
	n.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(c.Port)
	n.Status.NodeInfo = corev1.NodeSystemInfo{
		OperatingSystem:         "linux",
		Architecture:            runtime.GOARCH,
		KubeletVersion:          c.Version,
		ContainerRuntimeVersion: "smolvm://" + c.Version,
	}
	// The node is ready once registered: its Manager is open. It has no
	// pressure of its own to report; each VM is bounded by its group.
	now := metav1.Now()
	n.Status.Phase = corev1.NodeRunning
	n.Status.Conditions = nil
	for _, t := range []corev1.NodeConditionType{corev1.NodeReady, corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure, corev1.NodeNetworkUnavailable} {
		cond := corev1.NodeCondition{Type: t, Status: corev1.ConditionFalse, LastHeartbeatTime: now, LastTransitionTime: now, Reason: "SmolvmNode"}
		if t == corev1.NodeReady {
			cond.Status, cond.Reason, cond.Message = corev1.ConditionTrue, "KubeletReady", "smolvm node is ready"
		}
		n.Status.Conditions = append(n.Status.Conditions, cond)
	}
}

// servingCert is the kubelet API's certificate.
func servingCert(c Config, ip net.IP) (tls.Certificate, error) {
	if c.CertFile != "" || c.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("loading the kubelet API certificate: %w", err)
		}
		return cert, nil
	}
	certPEM, keyPEM, err := certutil.GenerateSelfSignedCertKey(c.Name, []net.IP{ip}, []string{c.Name})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("making a self-signed kubelet API certificate: %w", err)
	}
	return tls.X509KeyPair(certPEM, keyPEM)
}

// hostMemoryMiB is the host's memory.
func hostMemoryMiB() (int, error) {
	fs, err := procfs.NewDefaultFS()
	if err != nil {
		return 0, fmt.Errorf("reading /proc: %w", err)
	}
	mi, err := fs.Meminfo()
	if err != nil {
		return 0, fmt.Errorf("reading the host's memory size: %w", err)
	}
	if mi.MemTotalBytes == nil {
		return 0, errors.New("no MemTotal in /proc/meminfo: pass --memory-mib")
	}
	return int(*mi.MemTotalBytes >> 20), nil
}

// The informers the pod controller takes, each over one shared informer.
type (
	podInformer       struct{ i cache.SharedIndexInformer }
	secretInformer    struct{ i cache.SharedIndexInformer }
	configMapInformer struct{ i cache.SharedIndexInformer }
	serviceInformer   struct{ i cache.SharedIndexInformer }
)

func (p podInformer) Informer() cache.SharedIndexInformer { return p.i }
func (p podInformer) Lister() corev1listers.PodLister {
	return corev1listers.NewPodLister(p.i.GetIndexer())
}

func (s secretInformer) Informer() cache.SharedIndexInformer { return s.i }
func (s secretInformer) Lister() corev1listers.SecretLister {
	return corev1listers.NewSecretLister(s.i.GetIndexer())
}

func (c configMapInformer) Informer() cache.SharedIndexInformer { return c.i }
func (c configMapInformer) Lister() corev1listers.ConfigMapLister {
	return corev1listers.NewConfigMapLister(c.i.GetIndexer())
}

func (s serviceInformer) Informer() cache.SharedIndexInformer { return s.i }
func (s serviceInformer) Lister() corev1listers.ServiceLister {
	return corev1listers.NewServiceLister(s.i.GetIndexer())
}
