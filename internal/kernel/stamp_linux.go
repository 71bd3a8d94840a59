package kernel

import (
	"os"
	"syscall"
	"time"
)

// statIDs is st's device, inode and change time: a file replaced by
// another of the same size and modification time still differs in these.
func statIDs(st os.FileInfo) (dev, ino uint64, ctime time.Time) {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, time.Time{}
	}
	return sys.Dev, sys.Ino, time.Unix(sys.Ctim.Sec, sys.Ctim.Nsec)
}
