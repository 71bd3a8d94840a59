package kernel

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/smolvm/smolvm/internal/datadir"
)

// ImportHost imports a kernel installed on the host: vmlinuzPath (such as
// /boot/vmlinuz-X) and its module tree modulesDir (/lib/modules/X). The
// version comes from the vmlinuz file name, else from the module directory's
// name; when both name one, they must agree. The module tree is copied, so
// a later host upgrade does not change an imported kernel.
func ImportHost(ctx context.Context, d datadir.Dir, vmlinuzPath, modulesDir string) (*Kernel, error) {
	k, err := importHost(ctx, d, vmlinuzPath, modulesDir)
	if err != nil {
		return nil, fmt.Errorf("import kernel %s: %w", vmlinuzPath, err)
	}
	return k, nil
}

func importHost(ctx context.Context, d datadir.Dir, vmlinuzPath, modulesDir string) (_ *Kernel, err error) {
	version, err := hostVersion(vmlinuzPath, modulesDir)
	if err != nil {
		return nil, err
	}
	if fi, err := os.Stat(modulesDir); err != nil {
		return nil, fmt.Errorf("modules: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("modules: %s is not a directory", modulesDir)
	}
	vmlinuz, err := os.ReadFile(vmlinuzPath)
	if err != nil {
		return nil, err
	}
	vmlinux, err := ExtractVmlinux(vmlinuz)
	if err != nil {
		return nil, err
	}

	tmp, err := tempDir(d, "kernel-import-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(tmp)
		}
	}()
	if err := os.WriteFile(filepath.Join(tmp, vmlinuxName), vmlinux, 0o644); err != nil {
		return nil, err
	}
	// The config sits next to the kernel in /boot on Debian and most others;
	// it is informative only, so its absence is not an error.
	if cfg, err := os.ReadFile(filepath.Join(filepath.Dir(vmlinuzPath), "config-"+version)); err == nil {
		if err := os.WriteFile(filepath.Join(tmp, configName), cfg, 0o644); err != nil {
			return nil, err
		}
	}
	if err := copyTree(ctx, modulesDir, filepath.Join(tmp, modulesName)); err != nil {
		return nil, err
	}
	return install(d, tmp, version)
}

func hostVersion(vmlinuzPath, modulesDir string) (string, error) {
	// /boot/vmlinuz is often a link to /boot/vmlinuz-X.
	resolved, err := filepath.EvalSymlinks(vmlinuzPath)
	if err != nil {
		return "", err
	}
	version := ""
	if base := filepath.Base(resolved); strings.HasPrefix(base, "vmlinuz-") {
		version = strings.TrimPrefix(base, "vmlinuz-")
	} else if resolved, err := filepath.EvalSymlinks(modulesDir); err == nil {
		version = filepath.Base(resolved)
	}
	if err := validVersion(version); err != nil {
		return "", fmt.Errorf("cannot tell the kernel version from %s or %s (expected vmlinuz-VERSION or a modules directory named VERSION): %w", vmlinuzPath, modulesDir, err)
	}
	// Modules of another build fail to load only inside the guest, so
	// check here that the tree was built for this kernel.
	modVersion, err := modulesRelease(modulesDir)
	if err != nil {
		return "", err
	}
	if modVersion != version {
		return "", fmt.Errorf("modules in %s are for kernel %s, not %s", modulesDir, modVersion, version)
	}
	return version, nil
}

// modulesRelease returns the kernel release a module tree was built for,
// from the vermagic of its first module.
func modulesRelease(dir string) (string, error) {
	var first string
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if e.Type().IsRegular() && moduleName(p) != "" {
			first = p
			return fs.SkipAll
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("modules: %w", err)
	}
	if first == "" {
		return "", fmt.Errorf("no kernel modules in %s", dir)
	}
	info, err := readModinfo(first)
	if err != nil {
		return "", err
	}
	release, _, _ := strings.Cut(info["vermagic"], " ")
	if release == "" {
		return "", fmt.Errorf("module %s: no vermagic", first)
	}
	return release, nil
}

// copyTree copies the regular files and directories under src to dst.
// Symbolic links are skipped: in a module tree they are build and source,
// which point into the host's kernel headers.
func copyTree(ctx context.Context, src, dst string) error {
	return filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case e.IsDir():
			return os.MkdirAll(target, 0o755)
		case e.Type().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			return writeFile(target, f, 0o644)
		}
		return nil
	})
}
