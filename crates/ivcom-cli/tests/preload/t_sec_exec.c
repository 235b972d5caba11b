/* Security: what a program exec'd without the library inherits of an accelerated
 * connection. A root server accepts a connection, reads the client's secret, forks, drops
 * privileges to another user and execs a helper with LD_PRELOAD removed from its
 * environment (as a careful server drops privileges before running untrusted code). The
 * helper looks for every descriptor it inherited: memfds (it maps them and searches them for
 * the client's secret) and sockets (it writes a forged reply into them, when asked to).
 * Then the real server answers. Printed: what the helper found, and what the client got.
 *
 * Usage: t_sec_exec MODE UID GID      MODE: cloexec (accept4 with SOCK_CLOEXEC, helper may
 *                                     inject) or inherit (socket left open across the exec,
 *                                     helper only looks for memory)
 *        t_sec_exec helper SECRET INJECT      (run by the server) */
#include "common.h"
#include <dirent.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define SECRET "SECRET-7c1e52a9"
#define REPLY "REAL-REPLY"

extern char **environ;

static int helper(const char *secret, int inject) {
    int memfds = 0, seen = 0, injected = 0;
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL, "opendir");
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == dirfd(d)) continue;
        char p[64], l[256];
        snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(p, l, sizeof l - 1);
        if (n <= 0) continue;
        l[n] = 0;
        if (strncmp(l, "/memfd:", 7) == 0) {
            memfds++;
            struct stat st;
            if (fstat(fd, &st) == 0 && st.st_size > 0) {
                unsigned char *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                if (m != MAP_FAILED) {
                    if (memmem(m, (size_t)st.st_size, secret, strlen(secret)) != NULL) seen = 1;
                    munmap(m, (size_t)st.st_size);
                }
            }
        } else if (strncmp(l, "socket:", 7) == 0 && inject && fd > 2) {
            if (send(fd, "FORGED-REP", 10, MSG_NOSIGNAL | MSG_DONTWAIT) == 10) injected++;
        }
    }
    closedir(d);
    say("helper (uid %d): memfds %d, client's secret seen %d, forged replies sent %d", (int)getuid(), memfds,
        seen, injected);
    return 0;
}

static int g_cloexec, g_uid, g_gid;

static void server(int l) {
    int c = accept4(l, NULL, NULL, g_cloexec ? SOCK_CLOEXEC : 0);
    CHECK(c >= 0, "accept4");
    write_all(c, "hello\n", 6);
    char b[64];
    read_exact(c, b, strlen(SECRET));
    CHECK(memcmp(b, SECRET, strlen(SECRET)) == 0, "secret");
    fflush(stdout);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        close(l);
        CHECK(setgroups(0, NULL) == 0, "setgroups");
        CHECK(setgid((gid_t)g_gid) == 0, "setgid");
        CHECK(setuid((uid_t)g_uid) == 0, "setuid");
        /* The environment without LD_PRELOAD. */
        int n = 0;
        while (environ[n]) n++;
        char **env = calloc((size_t)n + 1, sizeof *env);
        int k = 0;
        for (int i = 0; i < n; i++)
            if (strncmp(environ[i], "LD_PRELOAD=", 11) != 0) env[k++] = environ[i];
        char *argv[] = {"t_sec_exec", "helper", SECRET, g_cloexec ? "1" : "0", NULL};
        execve("/proc/self/exe", argv, env);
        CHECK(0, "execve");
    }
    int st;
    CHECK(waitpid(p, &st, 0) == p, "waitpid");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "helper failed");
    write_all(c, REPLY, strlen(REPLY));
    close(c);
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    char b[64];
    read_exact(s, b, 6);
    write_all(s, SECRET, strlen(SECRET));
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, b + got, sizeof b - 1 - got);
        if (r <= 0) break;
        got += (size_t)r;
        if (got == sizeof b - 1) break;
    }
    b[got] = 0;
    say("client: got reply '%s'", b);
    close(s);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 4 && strcmp(argv[1], "helper") == 0) return helper(argv[2], atoi(argv[3]));
    CHECK(argc == 4, "usage: t_sec_exec cloexec|inherit UID GID");
    g_cloexec = strcmp(argv[1], "cloexec") == 0;
    g_uid = atoi(argv[2]);
    g_gid = atoi(argv[3]);
    pair(0, server, client);
    say("done");
    return 0;
}
