/* exec with a connection left open: the new program image of each side takes the
 * connection over and the conversation continues, in order, with nothing lost. */
#include "common.h"

#define BIG (1u << 20)

static void exec_self(const char *mode, int fd) {
    char arg[16];
    snprintf(arg, sizeof arg, "%d", fd);
    fflush(stdout);
    execl("/proc/self/exe", "t_exec", mode, arg, (char *)NULL);
    CHECK(0, "execl");
}

static void rounds(int fd, int n, int asking) {
    char b[32], want[32];
    for (int i = 0; i < n; i++) {
        if (asking) {
            int l = snprintf(b, sizeof b, "q%05d", i);
            write_all(fd, b, (size_t)l);
            read_exact(fd, b, 6);
            snprintf(want, sizeof want, "a%05d", i);
            CHECK(memcmp(b, want, 6) == 0, "answer %d", i);
        } else {
            read_exact(fd, b, 6);
            snprintf(want, sizeof want, "q%05d", i);
            CHECK(memcmp(b, want, 6) == 0, "question %d", i);
            b[0] = 'a';
            write_all(fd, b, 6);
        }
    }
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    rounds(s, 100, 1);
    exec_self("client-after-exec", s);
}

static void server(int l) {
    int c = accept_one(l);
    rounds(c, 100, 0);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        close(l);
        exec_self("server-after-exec", c);
    }
    close(c);
    int st;
    waitpid(p, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exec'd server");
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && strcmp(argv[1], "client-after-exec") == 0) {
        int s = atoi(argv[2]);
        rounds(s, 50, 1);
        unsigned char *b = malloc(BIG), *w = malloc(BIG);
        read_exact(s, b, BIG);
        fill(w, BIG, 11);
        say("client: after exec, 50 more rounds and %u bytes intact %d", BIG, memcmp(b, w, BIG) == 0);
        CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
        CHECK(read(s, b, 1) == 0, "EOF");
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "server-after-exec") == 0) {
        int c = atoi(argv[2]);
        rounds(c, 50, 0);
        unsigned char *b = malloc(BIG);
        fill(b, BIG, 11);
        write_all(c, b, BIG);
        char x;
        CHECK(read(c, &x, 1) == 0, "EOF");
        say("server: after exec, answered 50 rounds and sent %u bytes", BIG);
        close(c);
        return 0;
    }
    pair(0, server, client);
    say("done");
    return 0;
}
