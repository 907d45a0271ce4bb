/* A NetBSD-style device-mapper client: nothing but ioctl(fd, NETBSD_DM_IOCTL, &plistref) on
 * /dev/mapper/control with proplib XML, as libprop's prop_dictionary_sendrecv_ioctl does it
 * (send the XML with pref_len counting its NUL; on success the reply arrives in a fresh mapping
 * that is munmap'ed after use). Run under the dmemu shim.
 * Usage: netbsd NAME BACKING-FILE */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

struct plistref {
    void *pref_plist;
    size_t pref_len;
};

#define NETBSD_DM_IOCTL 0xC010FD00UL /* _IOWR(0xfd, 0, struct plistref) on LP64 */

static int fd;
static char reply[65536];

/* A request as libdm builds it: keys in proplib's sorted order, unsigned numbers in hex. */
static void request(char *out, size_t size, const char *cmd, const char *name, unsigned flags,
                    const char *cmd_data) {
    int n = snprintf(out, size,
                     "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                     "<!DOCTYPE plist PUBLIC \"-//Apple Computer//DTD PLIST 1.0//EN\" "
                     "\"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n"
                     "<plist version=\"1.0\">\n<dict>\n");
    if (cmd_data)
        n += snprintf(out + n, size - n, "\t<key>cmd_data</key>\n%s", cmd_data);
    n += snprintf(out + n, size - n, "\t<key>command</key>\n\t<string>%s</string>\n", cmd);
    n += snprintf(out + n, size - n, "\t<key>flags</key>\n\t<integer>0x%x</integer>\n", flags);
    if (name)
        n += snprintf(out + n, size - n, "\t<key>name</key>\n\t<string>%s</string>\n", name);
    snprintf(out + n, size - n,
             "\t<key>version</key>\n\t<array>\n\t\t<integer>0x4</integer>\n"
             "\t\t<integer>0x0</integer>\n\t\t<integer>0x0</integer>\n\t</array>\n"
             "</dict>\n</plist>\n");
}

/* One round trip. On success the reply is copied to `reply` and its mapping released the way
 * libprop releases it; returns the ioctl's result. */
static int sendrecv(const char *xml) {
    struct plistref pref = {.pref_plist = (void *)xml, .pref_len = strlen(xml) + 1};
    int r = ioctl(fd, NETBSD_DM_IOCTL, &pref);
    if (r != 0)
        return r;
    char *p = pref.pref_plist;
    if (pref.pref_plist == xml || pref.pref_len == 0 || p[pref.pref_len - 1] != '\0' ||
        strlen(p) + 1 != pref.pref_len || pref.pref_len >= sizeof(reply)) {
        fprintf(stderr, "bad reply buffer (len %zu)\n", pref.pref_len);
        exit(1);
    }
    memcpy(reply, p, pref.pref_len);
    if (munmap(pref.pref_plist, pref.pref_len) != 0) {
        perror("munmap");
        exit(1);
    }
    return 0;
}

/* The number after <key>KEY</key> in the reply (base 0, as proplib parses it); -1 if absent. */
static long long number(const char *key) {
    char k[64];
    snprintf(k, sizeof(k), "<key>%s</key>", key);
    const char *p = strstr(reply, k);
    if (!p || !(p = strstr(p, "<integer>")))
        return -1;
    return strtoll(p + strlen("<integer>"), NULL, 0);
}

/* The n-th <string> value after <key>KEY</key>, into out. */
static const char *string_after(const char *from, const char *key, char *out, size_t size) {
    char k[64];
    snprintf(k, sizeof(k), "<key>%s</key>", key);
    const char *p = strstr(from, k);
    out[0] = 0;
    if (!p)
        return NULL;
    p += strlen(k);
    while (*p == '\n' || *p == '\t')
        p++;
    if (!strncmp(p, "<string/>", 9))
        return p + 9;
    if (strncmp(p, "<string>", 8))
        return NULL;
    p += 8;
    const char *e = strstr(p, "</string>");
    size_t n = e - p < (long)size - 1 ? (size_t)(e - p) : size - 1;
    memcpy(out, p, n);
    out[n] = 0;
    return e;
}

static void check(int r, const char *what) {
    if (r != 0) {
        fprintf(stderr, "%s: %s\n", what, strerror(errno));
        exit(1);
    }
}

int main(int argc, char **argv) {
    static char xml[1 << 18];
    char table[2048];
    if (argc != 3)
        return 2;
    const char *name = argv[1];
    fd = open("/dev/mapper/control", O_RDWR);
    if (fd < 0) {
        perror("open");
        return 1;
    }

    request(xml, sizeof(xml), "version", NULL, 0, NULL);
    check(sendrecv(xml), "version");
    const char *v = strstr(reply, "<key>version</key>");
    unsigned ver[3];
    if (!v || sscanf(strstr(v, "<integer>"), "<integer>%x</integer>\n\t\t<integer>%x</integer>\n\t\t<integer>%x",
                     &ver[0], &ver[1], &ver[2]) != 3)
        return 1;
    printf("version %u.%u.%u\n", ver[0], ver[1], ver[2]);

    request(xml, sizeof(xml), "create", name, 0x4, NULL);
    check(sendrecv(xml), "create");
    printf("create: minor %lld flags %#llx\n", number("minor"), number("flags"));

    snprintf(table, sizeof(table),
             "\t<array>\n"
             "\t\t<dict>\n\t\t\t<key>length</key>\n\t\t\t<integer>0x8</integer>\n"
             "\t\t\t<key>params</key>\n\t\t\t<string>%s 0</string>\n"
             "\t\t\t<key>start</key>\n\t\t\t<integer>0x0</integer>\n"
             "\t\t\t<key>type</key>\n\t\t\t<string>linear</string>\n\t\t</dict>\n"
             "\t\t<dict>\n\t\t\t<key>length</key>\n\t\t\t<integer>0x8</integer>\n"
             "\t\t\t<key>params</key>\n\t\t\t<string/>\n"
             "\t\t\t<key>start</key>\n\t\t\t<integer>0x8</integer>\n"
             "\t\t\t<key>type</key>\n\t\t\t<string>zero</string>\n\t\t</dict>\n"
             "\t</array>\n",
             argv[2]);
    request(xml, sizeof(xml), "reload", name, 0x4, table);
    check(sendrecv(xml), "reload");
    printf("reload: flags %#llx\n", number("flags"));

    request(xml, sizeof(xml), "resume", name, 0x4, NULL);
    check(sendrecv(xml), "resume");
    printf("resume: flags %#llx\n", number("flags"));

    request(xml, sizeof(xml), "info", name, 0x4, NULL);
    check(sendrecv(xml), "info");
    printf("info: target_count %lld flags %#llx\n", number("target_count"), number("flags"));

    request(xml, sizeof(xml), "table", name, 0x14, NULL);
    check(sendrecv(xml), "table");
    printf("table:");
    const char *p = strstr(reply, "<key>cmd_data</key>");
    char params[256], type[32];
    while (p && (p = string_after(p, "params", params, sizeof(params)))) {
        p = string_after(p, "type", type, sizeof(type));
        printf(" [%s %s]", type, params);
    }
    printf("\n");

    request(xml, sizeof(xml), "remove", name, 0x4, NULL);
    check(sendrecv(xml), "remove");
    printf("remove: ok\n");

    request(xml, sizeof(xml), "info", name, 0x4, NULL);
    int r = sendrecv(xml);
    printf("info after remove: %d %s\n", r, r ? strerror(errno) : "");

    /* Beyond the kernel's 128 KiB copy-in limit. */
    memset(xml, ' ', sizeof(xml) - 1);
    xml[sizeof(xml) - 1] = 0;
    r = sendrecv(xml);
    printf("oversized: %d %s\n", r, r ? strerror(errno) : "");
    return 0;
}
