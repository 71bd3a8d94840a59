/*
 * A stand-in for libkrun.so, for tests on hosts without KVM or libkrun.
 *
 * Each function has libkrun.h's signature (the test compiles this with the
 * real header included when it has one, so the compiler checks them) and
 * appends its name and arguments, as one JSON array per line, to the file
 * $KRUN_STUB_LOG. It returns success, except the function named by
 * $KRUN_STUB_FAIL, which returns -EINVAL. krun_start_enter, as the real
 * one, does not return while the "VM" runs: it listens on the socket of
 * every listening vsock port, as libkrun does once the guest's vsock
 * device is up, and waits to be killed.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define STUB_CTX 7

static FILE *out;

static void begin(const char *name)
{
    if (!out) {
        const char *p = getenv("KRUN_STUB_LOG");
        out = fopen(p ? p : "/dev/null", "a");
        if (!out)
            abort();
    }
    fprintf(out, "[\"%s\"", name);
}

static void str(const char *s)
{
    fputc(',', out);
    if (!s) {
        fputs("null", out);
        return;
    }
    fputc('"', out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(out, "\\%c", c);
        else if (c < 0x20)
            fprintf(out, "\\u%04x", c);
        else
            fputc(c, out);
    }
    fputc('"', out);
}

static void num(long long v) { fprintf(out, ",%lld", v); }
static void boolean(bool b) { fputs(b ? ",true" : ",false", out); }

static void mac(const uint8_t *m)
{
    if (!m) {
        fputs(",null", out);
        return;
    }
    fprintf(out, ",\"%02x:%02x:%02x:%02x:%02x:%02x\"", m[0], m[1], m[2], m[3], m[4], m[5]);
}

/* end finishes the line and returns what the call answers. */
static int32_t end(const char *name)
{
    fputs("]\n", out);
    fflush(out);
    const char *fail = getenv("KRUN_STUB_FAIL");
    if (fail && strcmp(fail, name) == 0)
        return -EINVAL;
    return 0;
}

#define LISTEN_MAX 8
static char *listen_paths[LISTEN_MAX];
static int nlisten;

#ifndef OMIT_krun_set_log_level
int32_t krun_set_log_level(uint32_t level)
{
    begin(__func__);
    num(level);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_create_ctx
int32_t krun_create_ctx(void)
{
    begin(__func__);
    int32_t rc = end(__func__);
    return rc < 0 ? rc : STUB_CTX;
}
#endif

#ifndef OMIT_krun_set_vm_config
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib)
{
    begin(__func__);
    num(ctx_id);
    num(num_vcpus);
    num(ram_mib);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_set_kernel
int32_t krun_set_kernel(uint32_t ctx_id, const char *kernel_path, uint32_t kernel_format,
                        const char *initramfs, const char *cmdline)
{
    begin(__func__);
    num(ctx_id);
    str(kernel_path);
    num(kernel_format);
    str(initramfs);
    str(cmdline);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_add_disk
int32_t krun_add_disk(uint32_t ctx_id, const char *block_id, const char *disk_path, bool read_only)
{
    begin(__func__);
    num(ctx_id);
    str(block_id);
    str(disk_path);
    boolean(read_only);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_disable_implicit_vsock
int32_t krun_disable_implicit_vsock(uint32_t ctx_id)
{
    begin(__func__);
    num(ctx_id);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_add_vsock
int32_t krun_add_vsock(uint32_t ctx_id, uint32_t tsi_features)
{
    begin(__func__);
    num(ctx_id);
    num(tsi_features);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_add_vsock_port2
int32_t krun_add_vsock_port2(uint32_t ctx_id, uint32_t port, const char *c_filepath, bool listen)
{
    begin(__func__);
    num(ctx_id);
    num(port);
    str(c_filepath);
    boolean(listen);
    int32_t rc = end(__func__);
    /* As libkrun: a listening socket's path must not exist yet. */
    if (rc == 0 && listen && access(c_filepath, F_OK) == 0)
        return -EEXIST;
    if (rc == 0 && listen && nlisten < LISTEN_MAX)
        listen_paths[nlisten++] = strdup(c_filepath);
    return rc;
}
#endif

#ifndef OMIT_krun_add_net_unixstream
int32_t krun_add_net_unixstream(uint32_t ctx_id, const char *c_path, int fd, uint8_t *const c_mac,
                                uint32_t features, uint32_t flags)
{
    begin(__func__);
    num(ctx_id);
    str(c_path);
    num(fd);
    mac(c_mac);
    num(features);
    num(flags);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_set_console_output
int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath)
{
    begin(__func__);
    num(ctx_id);
    str(c_filepath);
    return end(__func__);
}
#endif

#ifndef OMIT_krun_start_enter
int32_t krun_start_enter(uint32_t ctx_id)
{
    begin(__func__);
    num(ctx_id);
    int32_t rc = end(__func__);
    if (rc < 0)
        return rc;
    for (int i = 0; i < nlisten; i++) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        strncpy(sa.sun_path, listen_paths[i], sizeof(sa.sun_path) - 1);
        if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(s, 16) < 0)
            return -errno;
    }
    for (;;)
        pause();
}
#endif
