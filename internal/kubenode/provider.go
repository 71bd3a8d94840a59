package kubenode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
	utilexec "k8s.io/utils/exec"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// mainTag tags the process a pod's container command runs as.
const mainTag = "main"

// resync is how often every pod's status is read again, in case an event
// was missed.
const resync = 10 * time.Second

// Provider maps a node's pods onto sandboxes of one Manager.
type Provider struct {
	m      *sandbox.Manager
	node   string
	nodeIP string
	log    *slog.Logger

	// finished, when set, removes a deleted pod from the API once its
	// sandbox is gone, as a kubelet does once its containers are.
	finished func(ctx context.Context, pod *corev1.Pod)

	mu     sync.Mutex
	pods   map[string]*tracked // by namespace/name
	notify func(*corev1.Pod)
}

// tracked is a pod the node runs, with its sandbox.
type tracked struct {
	pod     *corev1.Pod // the spec as last given; status as last reported
	id      string      // the sandbox, "" when the pod could not have one
	started bool        // the container command was started
	// deleting is set while the node deletes the sandbox itself: its
	// disappearance is then no news to report.
	deleting bool
}

// NewProvider returns the provider of node (reached at nodeIP) over m,
// holding every sandbox m has for node already.
func NewProvider(ctx context.Context, m *sandbox.Manager, node, nodeIP string, log *slog.Logger) (*Provider, error) {
	p := &Provider{m: m, node: node, nodeIP: nodeIP, log: log, pods: map[string]*tracked{}}
	infos, err := m.Find(ctx, map[string]string{LabelNode: node})
	if err != nil {
		return nil, fmt.Errorf("listing the node's sandboxes: %w", err)
	}
	for _, info := range infos {
		pod := adopted(info)
		pod.Status = *podStatus(pod, info, nodeIP)
		p.pods[podKey(pod.Namespace, pod.Name)] = &tracked{pod: pod, id: info.ID, started: true}
		log.Info("re-adopted a pod's sandbox", "pod", podKey(pod.Namespace, pod.Name), "sandbox", info.ID, "status", info.Status)
	}
	return p, nil
}

// CreatePod creates pod's sandbox and returns once it is creating; its
// status follows through NotifyPods.
func (p *Provider) CreatePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	req, err := CreateRequestOf(p.node, p.nodeIP, pod)
	if err != nil {
		p.refuse(key, pod, err)
		return nil
	}
	info, err := p.m.CreateAsync(ctx, req)
	if err != nil {
		var se *sandbox.Error
		if errors.As(err, &se) && se.Kind == sandbox.KindInvalid {
			p.refuse(key, pod, err)
			return nil
		}
		return fmt.Errorf("creating the sandbox of pod %s: %w", key, err)
	}
	pod = pod.DeepCopy()
	pod.Status = *podStatus(pod, info, p.nodeIP)
	p.store(key, &tracked{pod: pod, id: info.ID})
	p.log.Info("creating a pod's sandbox", "pod", key, "sandbox", info.ID)
	p.send(pod)
	return nil
}

// refuse fails a pod no sandbox can run at once, rather than have it
// retried forever.
func (p *Provider) refuse(key string, pod *corev1.Pod, why error) {
	pod = pod.DeepCopy()
	pod.Status = corev1.PodStatus{Phase: corev1.PodFailed, Reason: "InvalidSmolvmPod", Message: why.Error(), HostIP: p.nodeIP}
	p.store(key, &tracked{pod: pod})
	p.send(pod)
}

// UpdatePod takes the new spec; a running VM keeps its shape. A pod of
// the same name but another uid (deleted and made again while the node
// was down) gets a sandbox of its own.
func (p *Provider) UpdatePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	t, ok := p.pods[key]
	if ok && t.pod.UID == pod.UID {
		status := t.pod.Status
		t.pod = pod.DeepCopy()
		t.pod.Status = status
	}
	p.mu.Unlock()
	if !ok {
		return errdefs.NotFoundf("pod %s", key)
	}
	if t.pod.UID == pod.UID {
		return nil
	}
	// Not through DeletePod: the pod controller must not be told that
	// the pod of this name ended.
	if err := p.deleteSandbox(ctx, key, t); err != nil {
		return err
	}
	p.mu.Lock()
	delete(p.pods, key)
	p.mu.Unlock()
	return p.CreatePod(ctx, pod)
}

// deleteSandbox deletes the sandbox of t, key's pod, if it has one and it
// exists.
func (p *Provider) deleteSandbox(ctx context.Context, key string, t *tracked) error {
	if t.id == "" {
		return nil
	}
	p.mu.Lock()
	t.deleting = true
	p.mu.Unlock()
	err := p.m.Delete(ctx, t.id)
	var se *sandbox.Error
	if err != nil && !(errors.As(err, &se) && se.Kind == sandbox.KindNotFound) {
		p.mu.Lock()
		t.deleting = false
		p.mu.Unlock()
		return fmt.Errorf("deleting the sandbox of pod %s: %w", key, err)
	}
	p.log.Info("deleted a pod's sandbox", "pod", key, "sandbox", t.id)
	return nil
}

// DeletePod deletes pod's sandbox and reports the pod terminated.
func (p *Provider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	t, ok := p.pods[key]
	p.mu.Unlock()
	if !ok {
		return errdefs.NotFoundf("pod %s", key)
	}
	if err := p.deleteSandbox(ctx, key, t); err != nil {
		return err
	}
	p.mu.Lock()
	delete(p.pods, key)
	p.mu.Unlock()
	done := pod.DeepCopy()
	done.Status = *terminated(t.pod, "Deleted", "the sandbox was deleted")
	p.send(done)
	// Without this the pod controller removes the pod only when its
	// grace period (30 s by default) has passed: it does not act on the
	// status just sent.
	if p.finished != nil && pod.DeletionTimestamp != nil {
		p.finished(ctx, pod)
	}
	return nil
}

// GetPod is the pod as the node runs it.
func (p *Provider) GetPod(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.pods[podKey(namespace, name)]
	if !ok {
		return nil, errdefs.NotFoundf("pod %s/%s", namespace, name)
	}
	return t.pod.DeepCopy(), nil
}

// GetPodStatus is the pod's status, read from its sandbox now.
func (p *Provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.refresh(ctx, podKey(namespace, name))
	if err != nil {
		return nil, err
	}
	return pod.Status.DeepCopy(), nil
}

// GetPods is every pod the node runs.
func (p *Provider) GetPods(ctx context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*corev1.Pod, 0, len(p.pods))
	for _, t := range p.pods {
		out = append(out, t.pod.DeepCopy())
	}
	return out, nil
}

// NotifyPods registers the callback status changes go to, and starts
// following the Manager's events until ctx ends.
func (p *Provider) NotifyPods(ctx context.Context, cb func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = cb
	p.mu.Unlock()
	go p.follow(ctx)
}

// follow turns sandbox events into pod status updates, and reads every
// pod's status again now and then.
func (p *Provider) follow(ctx context.Context) {
	_, _, events, cancel := p.m.Subscribe(0, false)
	defer cancel()
	tick := time.NewTicker(resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				// The Manager is closing.
				return
			}
			if ev.Type != sandbox.EventSandboxUpdated && ev.Type != sandbox.EventSandboxCreated {
				continue
			}
			if key := p.keyOf(ev.SandboxID); key != "" {
				p.refreshAndSend(ctx, key)
			}
		case <-tick.C:
			p.mu.Lock()
			keys := make([]string, 0, len(p.pods))
			for k := range p.pods {
				keys = append(keys, k)
			}
			p.mu.Unlock()
			for _, k := range keys {
				p.refreshAndSend(ctx, k)
			}
		}
	}
}

func (p *Provider) keyOf(id string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, t := range p.pods {
		if t.id == id {
			return k
		}
	}
	return ""
}

// refreshAndSend reads key's status and reports it if it changed.
func (p *Provider) refreshAndSend(ctx context.Context, key string) {
	p.mu.Lock()
	t, ok := p.pods[key]
	var before string
	if ok {
		before = phaseLine(&t.pod.Status)
	}
	p.mu.Unlock()
	if !ok {
		return
	}
	pod, err := p.refresh(ctx, key)
	p.mu.Lock()
	// The node may be deleting it, or have begun to since.
	gone := t.deleting || p.pods[key] != t
	p.mu.Unlock()
	if gone {
		return
	}
	if err != nil {
		if ctx.Err() == nil {
			p.log.Warn("reading a pod's sandbox", "pod", key, "err", err)
		}
		return
	}
	if phaseLine(&pod.Status) != before {
		p.send(pod)
	}
	if pod.Status.Phase == corev1.PodRunning {
		p.startCommand(ctx, key)
	}
}

// phaseLine is what about a status is worth reporting when it changes.
func phaseLine(st *corev1.PodStatus) string {
	ready := false
	for _, c := range st.Conditions {
		if c.Type == corev1.PodReady {
			ready = c.Status == corev1.ConditionTrue
		}
	}
	return fmt.Sprintf("%s/%s/%v/%s", st.Phase, st.Reason, ready, st.Message)
}

// refresh reads key's sandbox and updates the pod's status from it.
func (p *Provider) refresh(ctx context.Context, key string) (*corev1.Pod, error) {
	p.mu.Lock()
	t, ok := p.pods[key]
	p.mu.Unlock()
	if !ok {
		ns, name, _ := strings.Cut(key, "/")
		return nil, errdefs.NotFoundf("pod %s/%s", ns, name)
	}
	p.mu.Lock()
	deleting := t.deleting
	p.mu.Unlock()
	if t.id == "" || deleting {
		return t.pod.DeepCopy(), nil
	}
	info, err := p.m.Get(ctx, t.id)
	var st *corev1.PodStatus
	var se *sandbox.Error
	switch {
	case errors.As(err, &se) && se.Kind == sandbox.KindNotFound:
		// Deleted behind the node's back: the pod has ended.
		st = terminated(t.pod, "SandboxGone", "the sandbox "+t.id+" no longer exists")
		st.Phase = corev1.PodFailed
	case err != nil:
		return nil, err
	default:
		st = podStatus(t.pod, info, p.nodeIP)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if cur, ok := p.pods[key]; ok && cur == t {
		t.pod.Status = *st
	}
	return t.pod.DeepCopy(), nil
}

// startCommand runs the container's command once the sandbox is up.
func (p *Provider) startCommand(ctx context.Context, key string) {
	p.mu.Lock()
	t, ok := p.pods[key]
	if !ok || t.started {
		p.mu.Unlock()
		return
	}
	t.started = true
	req := sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Argv: command(t.pod)}, Tag: mainTag}
	if len(t.pod.Spec.Containers) > 0 {
		req.Cwd = t.pod.Spec.Containers[0].WorkingDir
	}
	id := t.id
	p.mu.Unlock()
	if len(req.Argv) == 0 {
		return
	}
	if _, err := p.m.StartProcess(ctx, id, req); err != nil {
		p.log.Warn("starting a pod's command", "pod", key, "sandbox", id, "err", err)
	}
}

func (p *Provider) store(key string, t *tracked) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[key] = t
}

func (p *Provider) send(pod *corev1.Pod) {
	p.mu.Lock()
	cb := p.notify
	p.mu.Unlock()
	if cb != nil {
		cb(pod.DeepCopy())
	}
}

// sandboxOf is the running sandbox of a pod.
func (p *Provider) sandboxOf(namespace, name string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.pods[podKey(namespace, name)]
	if !ok || t.id == "" {
		return "", errdefs.NotFoundf("pod %s/%s has no sandbox on this node", namespace, name)
	}
	return t.id, nil
}

// GetContainerLogs is the output of the container's command when it has
// one, else the VM's console.
func (p *Provider) GetContainerLogs(ctx context.Context, namespace, podName, containerName string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	id, err := p.sandboxOf(namespace, podName)
	if err != nil {
		return nil, err
	}
	var text string
	if pid := p.mainPID(ctx, id); pid > 0 {
		out, err := p.m.ProcessOutput(ctx, id, pid)
		if err != nil {
			return nil, err
		}
		var b strings.Builder
		for _, c := range out.Chunks {
			b.Write(c.Data)
		}
		text = b.String()
	} else if text, err = p.m.ConsoleLog(ctx, id); err != nil {
		return nil, err
	}
	if opts.Tail > 0 {
		lines := strings.SplitAfter(text, "\n")
		if lines[len(lines)-1] == "" {
			lines = lines[:len(lines)-1]
		}
		if len(lines) > opts.Tail {
			text = strings.Join(lines[len(lines)-opts.Tail:], "")
		}
	}
	if opts.LimitBytes > 0 && len(text) > opts.LimitBytes {
		text = text[:opts.LimitBytes]
	}
	return io.NopCloser(strings.NewReader(text)), nil
}

func (p *Provider) mainPID(ctx context.Context, id string) int {
	procs, err := p.m.Processes(ctx, id)
	if err != nil {
		return 0
	}
	for _, pr := range procs {
		if pr.Tag == mainTag {
			return pr.PID
		}
	}
	return 0
}

// RunInContainer runs cmd in the pod's VM, as kubectl exec asks: with its
// input, output and terminal streamed both ways, and its exit status
// handed back.
func (p *Provider) RunInContainer(ctx context.Context, namespace, podName, containerName string, cmd []string, attach api.AttachIO) error {
	id, err := p.sandboxOf(namespace, podName)
	if err != nil {
		return err
	}
	if len(cmd) == 0 {
		return errdefs.InvalidInput("no command to run")
	}
	req := sandbox.ProcessRequest{ExecRequest: sandbox.ExecRequest{Argv: cmd}}
	if attach.TTY() {
		req.PTY = &sandbox.TerminalSize{Cols: 80, Rows: 24}
	}
	proc, err := p.m.StartProcess(ctx, id, req)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	if in := attach.Stdin(); in != nil {
		// Not waited for: a read of the caller's stdin ends only when
		// the caller closes it or the exec's streams close, after this
		// returns.
		go func() {
			buf := make([]byte, 32<<10)
			for {
				n, rerr := in.Read(buf)
				if n > 0 {
					if err := p.m.SendInput(ctx, id, proc.PID, buf[:n], false); err != nil {
						return
					}
				}
				if rerr != nil {
					// End of input closes the process's stdin, as a
					// pipe would.
					if err := p.m.SendInput(ctx, id, proc.PID, nil, true); err != nil && ctx.Err() == nil {
						p.log.Debug("closing an exec's input", "sandbox", id, "err", err)
					}
					return
				}
			}
		}()
	}
	if resize := attach.Resize(); resize != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case sz, ok := <-resize:
					if !ok {
						return
					}
					if err := p.m.ResizeTerminal(ctx, id, proc.PID, sandbox.TerminalSize{Cols: int(sz.Width), Rows: int(sz.Height)}); err != nil && ctx.Err() == nil {
						p.log.Debug("resizing an exec's terminal", "sandbox", id, "err", err)
					}
				}
			}
		}()
	}
	stdout, stderr := attach.Stdout(), attach.Stderr()
	end, err := p.m.FollowProcess(ctx, id, proc.PID, true, nil, func(c sandbox.OutputChunk) error {
		w := stdout
		if c.Stream == "stderr" {
			w = stderr
		}
		if w == nil {
			return nil
		}
		_, err := w.Write(c.Data)
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			// The client left: the command goes with it.
			if serr := p.m.Signal(context.WithoutCancel(ctx), id, proc.PID, 9); serr != nil {
				p.log.Debug("ending a left exec", "sandbox", id, "err", serr)
			}
		}
		return err
	}
	cancel()
	if end.ExitCode != nil && *end.ExitCode != 0 {
		return utilexec.CodeExitError{Err: fmt.Errorf("command terminated with exit code %d", *end.ExitCode), Code: *end.ExitCode}
	}
	return nil
}

// AttachToContainer attaches to the container's command.
func (p *Provider) AttachToContainer(ctx context.Context, namespace, podName, containerName string, attach api.AttachIO) error {
	return errdefs.InvalidInput("attach is not supported on smolvm nodes; use exec")
}

// GetStatsSummary is not served yet: kubectl top and the metrics server
// see nothing from smolvm nodes.
func (p *Provider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	return nil, errdefs.InvalidInput("stats are not served by smolvm nodes")
}

// GetMetricsResource is not served yet, like GetStatsSummary.
func (p *Provider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return nil, errdefs.InvalidInput("metrics are not served by smolvm nodes")
}

// PortForward connects stream to the guest's port: through its exposed
// host port, or one exposed for the while.
func (p *Provider) PortForward(ctx context.Context, namespace, pod string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	id, err := p.sandboxOf(namespace, pod)
	if err != nil {
		return err
	}
	ports, err := p.m.Ports(ctx, id)
	if err != nil {
		return err
	}
	var addr string
	for _, f := range ports {
		if f.Guest == int(port) {
			addr = net.JoinHostPort(f.HostAddress, strconv.Itoa(f.Host))
		}
	}
	if addr == "" {
		f, err := p.m.ExposePort(ctx, id, network.Forward{Guest: int(port)})
		if err != nil {
			return err
		}
		defer func() {
			if _, err := p.m.ClosePort(context.WithoutCancel(ctx), id, int(port)); err != nil {
				p.log.Warn("closing a port-forward's port", "sandbox", id, "port", port, "err", err)
			}
		}()
		addr = net.JoinHostPort(f.HostAddress, strconv.Itoa(f.Host))
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connecting to port %d of pod %s/%s: %w", port, namespace, pod, err)
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(conn, stream); conn.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(stream, conn); done <- struct{}{} }()
	select {
	case <-ctx.Done():
	case <-done:
		<-done
	}
	return nil
}

// Ping answers the node controller's heartbeat: the node is alive while
// its Manager can read its store.
func (p *Provider) Ping(ctx context.Context) error {
	_, err := p.m.Find(ctx, map[string]string{LabelNode: p.node})
	return err
}

// NotifyNodeStatus: the node's status does not change by itself.
func (p *Provider) NotifyNodeStatus(ctx context.Context, cb func(*corev1.Node)) {}
