package network

import (
	"fmt"

	seccomp "github.com/elastic/go-seccomp-bpf"
)

// denied are the system calls a network process never makes: starting
// programs, tracing or reading other processes, changing mounts,
// namespaces, identities or the host's clock and name, loading kernel code
// or BPF, and kernel interfaces that have been a way in before (keyrings,
// userfaultfd, perf). What it does make (sockets, epoll, futexes, the
// Go runtime's threads) stays allowed; a list of what to forbid, as QEMU's
// own filter is, keeps working as the Go runtime changes.
var denied = []string{
	"execve", "execveat", "fork", "vfork",
	"ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
	"mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
	"open_by_handle_at", "name_to_handle_at", "mknod", "mknodat",
	"setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "setfsuid", "setfsgid", "capset",
	"kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
	"bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
	"reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "personality",
	"settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
	"iopl", "ioperm",
}

// restrict sets no_new_privs and installs the filter on every thread of
// the process.
func restrict() error {
	err := seccomp.LoadFilter(seccomp.Filter{
		NoNewPrivs: true,
		Flag:       seccomp.FilterFlagTSync,
		Policy: seccomp.Policy{
			DefaultAction: seccomp.ActionAllow,
			Syscalls:      []seccomp.SyscallGroup{{Action: seccomp.ActionErrno, Names: denied}},
		},
	})
	if err != nil {
		return fmt.Errorf("install the system call filter: %w", err)
	}
	return nil
}
