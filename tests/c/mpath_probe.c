/* ioctl(fd, REQUEST) on a block node, run under the dmemu shim: DM_MPATH_PROBE_PATHS
 * (_IO(0xfd, 18), the default) or any other request number. Prints "ok" or the errno's name.
 * Usage: mpath_probe PATH [REQUEST] */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#ifndef DM_MPATH_PROBE_PATHS
#define DM_MPATH_PROBE_PATHS _IO(0xfd, 18)
#endif

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH [REQUEST]\n", argv[0]);
        return 2;
    }
    unsigned long req = argc > 2 ? strtoul(argv[2], NULL, 0) : DM_MPATH_PROBE_PATHS;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        printf("open: %s\n", strerrorname_np(errno));
        return 1;
    }
    if (ioctl(fd, req, 0) == 0)
        printf("ok\n");
    else
        printf("%s\n", strerrorname_np(errno));
    close(fd);
    return 0;
}
