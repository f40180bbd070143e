/* The floor of a collection cycle: only the filesystem calls the host sources make per cycle, and
 * nothing else (no parsing). bench/scaling_bench.py records them in-process and compiles this at
 * run time (cc -O2).
 *
 *     readfiles LIST ROUNDS
 *
 * LIST has one call a line: "f PATH" (open, read to the end, close), "d PATH" (opendir, readdir
 * to the end, closedir) or "l PATH" (readlink). Each round makes every call once, reading into
 * one buffer kept across rounds (as pcietax keeps its /proc/interrupts buffer), and prints
 * "WALL_NS CPU_NS" for that round. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: readfiles LIST ROUNDS\n");
        return 2;
    }
    FILE *list = fopen(argv[1], "r");
    if (!list) {
        perror(argv[1]);
        return 1;
    }
    size_t n = 0, cap = 256;
    char **paths = malloc(cap * sizeof *paths);
    char line[8192];
    while (fgets(line, sizeof line, list)) {
        line[strcspn(line, "\n")] = 0;
        if (strlen(line) < 3 || line[1] != ' ')
            continue;
        if (n == cap)
            paths = realloc(paths, (cap *= 2) * sizeof *paths);
        paths[n++] = strdup(line);
    }
    fclose(list);
    size_t bufsize = 1 << 16;
    char *buf = malloc(bufsize);
    char link[4096];
    long long sink = 0;
    for (int r = 0, rounds = atoi(argv[2]); r < rounds; r++) {
        long long w0 = ns(CLOCK_MONOTONIC), c0 = ns(CLOCK_PROCESS_CPUTIME_ID);
        for (size_t i = 0; i < n; i++) {
            const char *path = paths[i] + 2;
            if (paths[i][0] == 'f') {
                int fd = open(path, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                    continue;
                size_t len = 0;
                for (;;) {
                    if (len == bufsize)
                        buf = realloc(buf, bufsize *= 2);
                    ssize_t got = read(fd, buf + len, bufsize - len);
                    if (got <= 0)
                        break;
                    len += (size_t)got;
                }
                sink += (long long)len;
                close(fd);
            } else if (paths[i][0] == 'd') {
                DIR *d = opendir(path);
                if (!d)
                    continue;
                while (readdir(d))
                    sink++;
                closedir(d);
            } else if (paths[i][0] == 'l') {
                sink += readlink(path, link, sizeof link);
            }
        }
        printf("%lld %lld\n", ns(CLOCK_MONOTONIC) - w0, ns(CLOCK_PROCESS_CPUTIME_ID) - c0);
    }
    return sink < 0;
}
