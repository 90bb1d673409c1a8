/* A "malicious" payload: tries the classic ways out of a container and reports each outcome.
 * Prints one line per attempt, "<attempt> <errno name>" or "<attempt> SUCCEEDED", and exits with
 * the number of attempts that succeeded. Built by the test suite with gcc. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int succeeded;

static void report(const char *what, long rc) {
    if (rc == -1) {
        printf("%s %s\n", what, strerrorname_np(errno));
    } else {
        printf("%s SUCCEEDED\n", what);
        succeeded++;
    }
}

int main(void) {
    report("unshare_user_mount", unshare(CLONE_NEWUSER | CLONE_NEWNS));
    report("remount_usr_rw", mount(NULL, "/usr", NULL, MS_REMOUNT | MS_BIND, NULL));
    report("ptrace_attach_init", ptrace(PTRACE_ATTACH, 1, NULL, NULL));
    report("open_init_mem", open("/proc/1/mem", O_RDWR));
    report("chroot", chroot("/tmp"));
    report("mknod_disk", mknod("/tmp/sda", 0060600, makedev(8, 0)));
    fflush(stdout);
    return succeeded;
}
