package bench

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/smolvm/smolvm/internal/sandbox"
)

// SoakOptions size a soak: Restores template clones created one after the
// other, each running one command, with the template rebuilt every
// PerBuild restores. A saved state is one sample of the save path and a
// clone one sample of the restore path, so both are counted.
type SoakOptions struct {
	Restores  int
	PerBuild  int // restores from one template build before it is rebuilt; 0 never rebuilds
	MemoryMiB int
	// Manager opens a manager that restores from templates.
	Manager func(ctx context.Context) (*sandbox.Manager, error)
}

// SoakResult counts what a soak saw.
type SoakResult struct {
	Restores int // clones created from a template and answering a command
	Builds   int // template builds
	// Crashes are clones that did not come up from their template (the
	// template was retired and the sandbox booted cold), or failed.
	Crashes  []string
	Create   Figure // create to first command, per restore
	Duration time.Duration
}

// Soak restores clones in a row and reports every one that did not come
// up from its template.
func Soak(ctx context.Context, o SoakOptions, log io.Writer) (*SoakResult, error) {
	m, err := o.Manager(ctx)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	r := &SoakResult{Create: Figure{Name: "template create to first command"}}
	start := time.Now()
	defer func() { r.Duration = time.Since(start) }()
	req := sandbox.CreateRequest{MemoryMiB: o.MemoryMiB}
	builds := 0
	for i := 0; i < o.Restores; i++ {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		if o.PerBuild > 0 && i > 0 && i%o.PerBuild == 0 {
			// Retire every template so the next create builds one anew.
			if _, err := m.PruneTemplates(ctx); err != nil {
				return r, fmt.Errorf("remove templates: %w", err)
			}
		}
		before, _ := m.Templates()
		t0 := time.Now()
		info, err := m.Create(ctx, req)
		if err != nil {
			r.Crashes = append(r.Crashes, fmt.Sprintf("restore %d: create: %v", i+1, err))
			fmt.Fprintf(log, "soak: restore %d: create failed: %v\n", i+1, err)
			continue
		}
		res, err := m.Exec(ctx, info.ID, sandbox.ExecRequest{Command: "cat /proc/sys/kernel/random/boot_id", Shell: sandbox.ShellRaw})
		took := time.Since(t0)
		after, _ := m.Templates()
		built := newest(after) != newest(before)
		if built {
			builds++
		}
		switch {
		case err != nil || res.ExitCode != 0:
			r.Crashes = append(r.Crashes, fmt.Sprintf("restore %d (%s): command: %v %s", i+1, info.ID, err, strings.TrimSpace(string(res.Stderr))))
			fmt.Fprintf(log, "soak: restore %d: the clone did not answer: %v\n", i+1, err)
		case info.Boot != sandbox.BootTemplate:
			r.Crashes = append(r.Crashes, fmt.Sprintf("restore %d (%s): booted %s: %s", i+1, info.ID, info.Boot, strings.Join(info.Warnings, "; ")))
			fmt.Fprintf(log, "soak: restore %d: not restored (%s): %s\n", i+1, info.Boot, strings.Join(info.Warnings, "; "))
		default:
			r.Restores++
			if !built { // a create that built the template is no restore figure
				r.Create.Samples = append(r.Create.Samples, took)
			}
		}
		if err := m.Delete(ctx, info.ID); err != nil {
			return r, fmt.Errorf("delete %s: %w", info.ID, err)
		}
		if (i+1)%25 == 0 {
			fmt.Fprintf(log, "soak: %d of %d restores, %d template builds, %d crashes\n", i+1, o.Restores, builds, len(r.Crashes))
		}
	}
	r.Builds = builds
	return r, nil
}

// newest names the newest template build, "" when there is none.
func newest(ts []sandbox.Template) string {
	if len(ts) == 0 {
		return ""
	}
	return ts[0].Dir
}

// Print writes the soak's outcome.
func (r *SoakResult) Print(w io.Writer) {
	fmt.Fprintf(w, "restores from a template: %d ok, %d crashed, %d template builds, in %s\n",
		r.Restores, len(r.Crashes), r.Builds, r.Duration.Round(time.Second))
	if len(r.Create.Samples) > 0 {
		fmt.Fprintf(w, "template create to first command: median %s, p95 %s\n", ms(r.Create.Median()), ms(r.Create.P95()))
	}
	for _, c := range r.Crashes {
		fmt.Fprintf(w, "  %s\n", c)
	}
}
