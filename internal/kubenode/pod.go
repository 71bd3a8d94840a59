// Package kubenode runs a Kubernetes node's pods as smolvm sandboxes: a
// virtual-kubelet provider over a local sandbox.Manager. Each pod is one
// sandbox (one VM); the pod's first container says what it runs.
package kubenode

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/smolvm/smolvm/internal/network"
	"github.com/smolvm/smolvm/internal/sandbox"
)

// Labels a node puts on each sandbox it creates, so that a restarted node
// finds its pods' sandboxes again.
const (
	LabelNode      = "smolvm.dev/node"
	LabelNamespace = "smolvm.dev/pod-namespace"
	LabelPod       = "smolvm.dev/pod-name"
	LabelUID       = "smolvm.dev/pod-uid"
)

// Pod annotations that shape the sandbox beyond what a pod spec says.
const (
	// AnnotationOS boots an OS preset (alpine, ubuntu, debian) instead of
	// the container's image.
	AnnotationOS = "smolvm.dev/os"
	// AnnotationDiskMiB is the sandbox's disk size in MiB.
	AnnotationDiskMiB = "smolvm.dev/disk-mib"
	// AnnotationNetwork is the network mode: open, restricted or off.
	AnnotationNetwork = "smolvm.dev/network"
	// AnnotationAllow lists, comma-separated, the addresses or prefixes a
	// restricted (or open) guest may reach besides the default.
	AnnotationAllow = "smolvm.dev/network-allow"
)

// defaultContainer names the container of a pod the node re-adopts from
// a sandbox, before the API's pod spec replaces it.
const defaultContainer = "sandbox"

// CreateRequestOf is the sandbox a pod asks for on node, whose address is
// nodeIP: ports without a hostIP of their own are exposed there, as a
// kubelet exposes hostPorts on the node's address.
func CreateRequestOf(node, nodeIP string, pod *corev1.Pod) (sandbox.CreateRequest, error) {
	if len(pod.Spec.Containers) != 1 {
		return sandbox.CreateRequest{}, fmt.Errorf("a smolvm pod has exactly one container (its VM), this one has %d", len(pod.Spec.Containers))
	}
	if len(pod.Spec.InitContainers) > 0 {
		return sandbox.CreateRequest{}, fmt.Errorf("init containers are not supported on smolvm nodes")
	}
	c := pod.Spec.Containers[0]
	req := sandbox.CreateRequest{
		Labels: map[string]string{
			LabelNode:      node,
			LabelNamespace: pod.Namespace,
			LabelPod:       pod.Name,
			LabelUID:       string(pod.UID),
		},
	}
	if os := pod.Annotations[AnnotationOS]; os != "" {
		req.OS = os
	} else {
		req.Image = c.Image
	}
	// Limits bound a VM; requests are what the scheduler counted, and
	// are taken when no limit is set.
	if q, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		req.MemoryMiB = int(q.Value() >> 20)
	} else if q, ok := c.Resources.Requests[corev1.ResourceMemory]; ok {
		req.MemoryMiB = int(q.Value() >> 20)
	}
	if q, ok := c.Resources.Limits[corev1.ResourceCPU]; ok {
		req.VCPUs = int(math.Ceil(float64(q.MilliValue()) / 1000))
	} else if q, ok := c.Resources.Requests[corev1.ResourceCPU]; ok {
		req.VCPUs = int(math.Ceil(float64(q.MilliValue()) / 1000))
	}
	if s := pod.Annotations[AnnotationDiskMiB]; s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			return sandbox.CreateRequest{}, fmt.Errorf("annotation %s: %q is not a size in MiB", AnnotationDiskMiB, s)
		}
		req.DiskSizeMiB = n
	}
	if s := pod.Annotations[AnnotationNetwork]; s != "" {
		req.Network.Mode = network.Mode(s)
	}
	if s := pod.Annotations[AnnotationAllow]; s != "" {
		for _, part := range strings.Split(s, ",") {
			part = strings.TrimSpace(part)
			p, err := netip.ParsePrefix(part)
			if err != nil {
				a, aerr := netip.ParseAddr(part)
				if aerr != nil {
					return sandbox.CreateRequest{}, fmt.Errorf("annotation %s: %q is neither an address nor a prefix", AnnotationAllow, part)
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			req.Network.Allow = append(req.Network.Allow, p)
		}
	}
	if err := req.Network.Normalize(); err != nil {
		return sandbox.CreateRequest{}, fmt.Errorf("annotation %s: %w", AnnotationNetwork, err)
	}
	for _, p := range c.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			return sandbox.CreateRequest{}, fmt.Errorf("port %d: only TCP ports can be exposed, not %s", p.ContainerPort, p.Protocol)
		}
		f := network.Forward{Guest: int(p.ContainerPort), Host: int(p.HostPort), HostAddress: p.HostIP}
		if f.HostAddress == "" {
			f.HostAddress = nodeIP
		}
		req.Ports = append(req.Ports, f)
	}
	if len(c.Env) > 0 {
		req.Env = map[string]string{}
		for _, e := range c.Env {
			// The pod controller resolves references before the
			// pod reaches the provider; what is left unresolved has
			// no value here.
			req.Env[e.Name] = e.Value
		}
	}
	return req, nil
}

// command is the container's command and arguments, run in the sandbox
// as a process once it is up; nil when the pod gives none.
func command(pod *corev1.Pod) []string {
	if len(pod.Spec.Containers) == 0 {
		return nil
	}
	c := pod.Spec.Containers[0]
	return append(append([]string(nil), c.Command...), c.Args...)
}

// podStatus is what pod's status is while its sandbox is as info says.
// nodeIP is the node's address: guest ports are reached there.
func podStatus(pod *corev1.Pod, info sandbox.Info, nodeIP string) *corev1.PodStatus {
	st := &corev1.PodStatus{
		HostIP:    nodeIP,
		HostIPs:   []corev1.HostIP{{IP: nodeIP}},
		PodIP:     nodeIP,
		PodIPs:    []corev1.PodIP{{IP: nodeIP}},
		StartTime: &metav1.Time{Time: info.CreatedAt},
		QOSClass:  corev1.PodQOSGuaranteed,
		Message:   "sandbox " + info.ID,
	}
	if pod.Status.StartTime != nil {
		st.StartTime = pod.Status.StartTime
	}
	name, image := defaultContainer, info.Image
	if len(pod.Spec.Containers) > 0 {
		name, image = pod.Spec.Containers[0].Name, pod.Spec.Containers[0].Image
	}
	cs := corev1.ContainerStatus{Name: name, Image: image, ImageID: info.Image, ContainerID: "smolvm://" + info.ID}
	started := metav1.Time{Time: info.CreatedAt}
	ready := false
	switch info.Status {
	case sandbox.StatusCreating:
		st.Phase = corev1.PodPending
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: "the VM is booting"}
	case sandbox.StatusRunning, sandbox.StatusPaused:
		st.Phase = corev1.PodRunning
		cs.State.Running = &corev1.ContainerStateRunning{StartedAt: started}
		ready = info.Status == sandbox.StatusRunning
		t := true
		cs.Started = &t
	case sandbox.StatusStopped:
		st.Phase = corev1.PodFailed
		st.Reason = "Stopped"
		cs.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Stopped", StartedAt: started, FinishedAt: metav1.Now()}
	default:
		st.Phase = corev1.PodFailed
		st.Reason = "SandboxError"
		st.Message = info.Error
		cs.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 1, Reason: "Error", Message: info.Error, StartedAt: started, FinishedAt: metav1.Now()}
	}
	cs.Ready = ready
	st.ContainerStatuses = []corev1.ContainerStatus{cs}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: metav1.Now()}
	}
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodScheduled, true),
		cond(corev1.PodInitialized, true),
		cond(corev1.ContainersReady, ready),
		cond(corev1.PodReady, ready),
	}
	return st
}

// terminated is pod's status once its sandbox is gone.
func terminated(pod *corev1.Pod, reason, message string) *corev1.PodStatus {
	st := pod.Status.DeepCopy()
	st.Phase = corev1.PodSucceeded
	st.Reason, st.Message = reason, message
	now := metav1.NewTime(time.Now())
	for i := range st.ContainerStatuses {
		cs := &st.ContainerStatuses[i]
		cs.Ready = false
		var started metav1.Time
		if cs.State.Running != nil {
			started = cs.State.Running.StartedAt
		}
		cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: reason, Message: message, StartedAt: started, FinishedAt: now}}
	}
	for i := range st.Conditions {
		if t := st.Conditions[i].Type; t == corev1.PodReady || t == corev1.ContainersReady {
			st.Conditions[i].Status = corev1.ConditionFalse
		}
	}
	return st
}

// adopted is the pod a sandbox found at start belongs to, as far as the
// sandbox's labels tell: enough for the pod controller to match it with
// the API's pod, or to delete it when the API has none.
func adopted(info sandbox.Info) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: info.Labels[LabelNamespace],
			Name:      info.Labels[LabelPod],
			UID:       types.UID(info.Labels[LabelUID]),
		},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: defaultContainer, Image: info.Image}}},
	}
}

func podKey(namespace, name string) string { return namespace + "/" + name }
