/* libudev's view of a block device number, run under the dmemu shim: what multipath-tools asks
 * libudev for a path device (udev_device_new_from_devnum and a few attributes). libudev is opened
 * with dlopen, so no development headers are needed.
 * Usage: udev_lookup MAJOR MINOR [ATTR...] */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/sysmacros.h>
#include <sys/types.h>

typedef void *(*new_fn)(void);
typedef void *(*from_devnum_fn)(void *, char, dev_t);
typedef const char *(*get_fn)(void *);
typedef const char *(*attr_fn)(void *, const char *);
typedef void *(*parent_fn)(void *);

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MAJOR MINOR [ATTR...]\n", argv[0]);
        return 2;
    }
    void *lib = dlopen("libudev.so.1", RTLD_NOW);
    if (!lib) {
        printf("no libudev: %s\n", dlerror());
        return 3;
    }
    void *udev = ((new_fn)dlsym(lib, "udev_new"))();
    from_devnum_fn from_devnum = (from_devnum_fn)dlsym(lib, "udev_device_new_from_devnum");
    void *d = from_devnum(udev, 'b', makedev(atoi(argv[1]), atoi(argv[2])));
    if (!d) {
        printf("no device\n");
        return 1;
    }
    const char *names[] = {"syspath", "sysname", "devnode", "subsystem", "devtype"};
    for (int i = 0; i < 5; i++) {
        char sym[64];
        snprintf(sym, sizeof(sym), "udev_device_get_%s", names[i]);
        const char *v = ((get_fn)dlsym(lib, sym))(d);
        printf("%s=%s\n", names[i], v ? v : "(null)");
    }
    attr_fn attr = (attr_fn)dlsym(lib, "udev_device_get_sysattr_value");
    for (int i = 3; i < argc; i++) {
        const char *v = attr(d, argv[i]);
        printf("%s=%s\n", argv[i], v ? v : "(null)");
    }
    void *p = ((parent_fn)dlsym(lib, "udev_device_get_parent"))(d);
    printf("parent=%s\n", p ? ((get_fn)dlsym(lib, "udev_device_get_syspath"))(p) : "(none)");
    return 0;
}
