/* A C client of /dev/mapper/control that uses only open/ioctl/poll, run under the dmemu shim:
 * checks DM_DEV_ARM_POLL readiness (as multipathd uses it) and an interrupted DM_DEV_WAIT.
 * Usage: control armpoll | control waitintr NAME */
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static void init(struct dm_ioctl *io, size_t size, const char *name) {
    memset(io, 0, size);
    io->version[0] = 4;
    io->data_size = size;
    io->data_start = sizeof(*io);
    if (name)
        strncpy(io->name, name, sizeof(io->name) - 1);
}

static int readable(int fd, int ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) > 0 && (p.revents & POLLIN);
}

static void on_alarm(int sig) { (void)sig; }

int main(int argc, char **argv) {
    union { struct dm_ioctl io; char buf[16384]; } u;
    int fd = open("/dev/mapper/control", O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    if (argc > 1 && !strcmp(argv[1], "armpoll")) {
        init(&u.io, sizeof(u), NULL);
        if (ioctl(fd, DM_DEV_ARM_POLL, &u.io)) { perror("arm"); return 1; }
        printf("armed, readable=%d\n", readable(fd, 0));
        fflush(stdout);
        if (system("dmsetup create polled --table '0 8 zero'")) return 1;
        printf("after create, readable=%d\n", readable(fd, 10000));
        init(&u.io, sizeof(u), NULL);
        if (ioctl(fd, DM_LIST_DEVICES, &u.io)) { perror("list"); return 1; }
        printf("list ok, still readable=%d\n", readable(fd, 0));
        init(&u.io, sizeof(u), NULL);
        if (ioctl(fd, DM_DEV_ARM_POLL, &u.io)) { perror("rearm"); return 1; }
        printf("rearmed, readable=%d\n", readable(fd, 0));
        return 0;
    }
    if (argc > 2 && !strcmp(argv[1], "waitintr")) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_alarm; /* no SA_RESTART: the wait must come back with EINTR */
        sigaction(SIGALRM, &sa, NULL);
        init(&u.io, sizeof(u), argv[2]);
        if (ioctl(fd, DM_DEV_STATUS, &u.io)) { perror("status"); return 1; }
        unsigned ev = u.io.event_nr;
        init(&u.io, sizeof(u), argv[2]);
        u.io.event_nr = ev;
        alarm(1);
        int r = ioctl(fd, DM_DEV_WAIT, &u.io);
        printf("wait returned %d errno %s\n", r, r ? strerror(errno) : "0");
        init(&u.io, sizeof(u), argv[2]);
        r = ioctl(fd, DM_DEV_STATUS, &u.io);
        printf("next ioctl returned %d, name %s\n", r, u.io.name);
        return 0;
    }
    return 2;
}
