package agent

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// account is who a command runs as.
type account struct {
	uid, gid uint32
	name     string
	home     string
	shell    string
}

// lookupUser resolves spec ("name", "uid", "uid:gid", "name:group") against
// the guest's /etc/passwd and /etc/group, as container runtimes do: a
// numeric uid need not exist in passwd.
func lookupUser(spec string) (account, error) {
	root := account{name: "root", home: "/root", shell: "/bin/sh"}
	if spec == "" || spec == "root" || spec == "0" {
		if e, ok := findEntry("/etc/passwd", "root", 0); ok {
			return passwdAccount(e), nil
		}
		return root, nil
	}
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	var acc account
	if uid, err := strconv.ParseUint(userPart, 10, 32); err == nil {
		acc = account{uid: uint32(uid), gid: uint32(uid), name: userPart, home: "/", shell: "/bin/sh"}
		if e, ok := findEntry("/etc/passwd", "", int(uid)); ok {
			acc = passwdAccount(e)
		}
	} else {
		e, ok := findEntry("/etc/passwd", userPart, -1)
		if !ok {
			return acc, fmt.Errorf("user %q not found in /etc/passwd", userPart)
		}
		acc = passwdAccount(e)
	}
	if hasGroup {
		if gid, err := strconv.ParseUint(groupPart, 10, 32); err == nil {
			acc.gid = uint32(gid)
		} else {
			e, ok := findEntry("/etc/group", groupPart, -1)
			if !ok {
				return acc, fmt.Errorf("group %q not found in /etc/group", groupPart)
			}
			acc.gid = uint32(atoi(e[2]))
		}
	}
	return acc, nil
}

func passwdAccount(e []string) account {
	a := account{uid: uint32(atoi(e[2])), gid: uint32(atoi(e[3])), name: e[0], home: "/", shell: "/bin/sh"}
	if len(e) > 5 && e[5] != "" {
		a.home = e[5]
	}
	if len(e) > 6 && e[6] != "" {
		a.shell = e[6]
	}
	return a
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// findEntry returns the colon-separated fields of the first line whose name
// is name, or whose id (third field) is id when name is "".
func findEntry(path, name string, id int) ([]string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		e := strings.Split(sc.Text(), ":")
		if len(e) < 4 {
			continue
		}
		if (name != "" && e[0] == name) || (name == "" && atoi(e[2]) == id && e[2] != "") {
			return e, true
		}
	}
	return nil, false
}
