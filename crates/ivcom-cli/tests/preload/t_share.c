/* Children that share the parent's memory, or clear out descriptors, leave the parent's
 * connections alone: a vfork child that points stdin at the connection, closes it and every
 * descriptor above 2 and execs; a clone(CLONE_VM | CLONE_VFORK) child that closes the
 * connection and puts a pipe at its number; a posix_spawn child with close and dup2 actions;
 * a forked child that closes every descriptor above 2 (close_range, closefrom, a loop) and
 * reuses the numbers, then makes a new connection of its own. After each, the parent's
 * connection still carries request/response rounds intact. */
#include "common.h"
#include <sched.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/syscall.h>

extern char **environ;

static int port_g;

static void rounds(int c, int n, const char *what) {
    char b[16];
    int ok = 0;
    for (int i = 0; i < n; i++) {
        char m[16];
        snprintf(m, sizeof m, "r%05d", i);
        write_all(c, m, 6);
        read_exact(c, b, 6);
        ok += memcmp(b, m, 6) == 0;
    }
    say("parent: %s: %d of %d rounds intact", what, ok, n);
}

static int clone_child(void *arg) {
    int c = *(int *)arg;
    int p[2];
    close(c);
    if (pipe(p) == 0) dup2(p[0], c);
    return 0;
}

static void client(int port) {
    port_g = port;
    int c = connect_to(0, port, 0);
    rounds(c, 20, "before");

    /* (a) vfork: the child's dup2/close/close_range/exec touch only its own table. */
    int in[2];
    CHECK(pipe(in) == 0, "pipe");
    write_all(in[1], "stdin-ok", 8);
    int saved = dup(0);
    dup2(in[0], 0);
    pid_t pid = vfork();
    if (pid == 0) {
        dup2(c, 0);
        close(c);
        syscall(SYS_close_range, 3u, ~0u, 0);
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    char b[8];
    read_exact(0, b, 8);
    say("parent: vfork: child exited %d, parent's stdin still its own: %d", WEXITSTATUS(st),
        memcmp(b, "stdin-ok", 8) == 0);
    dup2(saved, 0);
    close(saved);
    close(in[0]);
    close(in[1]);
    rounds(c, 20, "after vfork");

    /* (b) clone(CLONE_VM | CLONE_VFORK): the child closes the connection in its own table. */
    size_t sz = 256 * 1024;
    char *stack = malloc(sz);
    pid = clone(clone_child, stack + sz, CLONE_VM | CLONE_VFORK | SIGCHLD, &c);
    CHECK(pid > 0, "clone");
    waitpid(pid, &st, 0);
    free(stack);
    rounds(c, 20, "after clone(CLONE_VM)");

    /* (c) posix_spawn with actions on the connection's number. */
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, c, 0);
    posix_spawn_file_actions_addclose(&fa, c);
    char *argv[] = {"true", NULL};
    CHECK(posix_spawn(&pid, "/bin/true", &fa, NULL, argv, environ) == 0, "posix_spawn");
    posix_spawn_file_actions_destroy(&fa);
    waitpid(pid, &st, 0);
    rounds(c, 20, "after posix_spawn");

    /* (d) fork: the child closes everything above 2 three ways, reuses the numbers, and
     * makes a new connection. */
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        struct rlimit rl;
        getrlimit(RLIMIT_NOFILE, &rl);
        int top = rl.rlim_cur > 4096 ? 4096 : (int)rl.rlim_cur;
        for (int fd = 3; fd < top; fd++) close(fd);
        closefrom(3);
        close_range(3, ~0u, 0);
        int f = open("/dev/null", O_RDONLY);
        int g = open("/dev/null", O_RDONLY);
        int n = connect_to(0, port_g, 0);
        write_all(n, "child!", 6);
        read_exact(n, b, 6);
        say("child: after closing everything: reused %d %d, new connection echoed: %d", f == 3, g == 4,
            memcmp(b, "child!", 6) == 0);
        close(n);
        fflush(stdout);
        _exit(0);
    }
    waitpid(pid, &st, 0);
    say("parent: forked child exited %d", WEXITSTATUS(st));
    rounds(c, 20, "after the child closed everything");
    close(c);
}

static void server(int l) {
    int c = accept_one(l), d = -1;
    /* Echo the parent's connection; accept and echo the forked child's when it comes. */
    for (;;) {
        struct pollfd p[3] = {{c, POLLIN, 0}, {l, d < 0 ? POLLIN : 0, 0}, {d, POLLIN, 0}};
        CHECK(poll(p, d < 0 ? 2 : 3, 20000) > 0, "server poll");
        if (p[1].revents & POLLIN) d = accept_one(l);
        for (int i = 0; i < 3; i += 2) {
            if (i == 2 && d < 0) continue;
            if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            int fd = i == 0 ? c : d;
            char b[64];
            ssize_t r = read(fd, b, sizeof b);
            if (r <= 0) {
                close(fd);
                if (fd == c) {
                    if (d >= 0) close(d);
                    return;
                }
                d = -2; /* done with the child's */
                continue;
            }
            write_all(fd, b, (size_t)r);
        }
    }
}

int main(void) {
    pair(0, server, client);
    return 0;
}
