/* A connection whose first exchange is made by a forked child of the connecting process (the
 * child reads the listener's claim and exits); the parent goes on with it, in both
 * directions, and half-closes it, as over TCP. Client and server are one process here, so
 * the server's end is served only when the program itself calls. */
#include "common.h"

int main(void) {
    int port;
    int l = listen_any(0, &port);
    int s = connect_to(0, port, 0);
    int c = accept_one(l);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork");
    if (pid == 0) {
        write_all(s, "from-child", 10);
        char b[8];
        read_exact(s, b, 8);
        _exit(memcmp(b, "to-child", 8) == 0 ? 0 : 1);
    }
    char b[16];
    read_exact(c, b, 10);
    say("server: child's request %.10s", b);
    write_all(c, "to-child", 8);
    int st;
    waitpid(pid, &st, 0);
    say("child: answer intact %d", WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* The parent now: request, answer, then a half-close and a last answer. */
    for (int i = 0; i < 3; i++) {
        write_all(s, "parent", 6);
        read_exact(c, b, 6);
        write_all(c, "answer", 6);
        read_exact(s, b, 6);
        say("parent: round %d answer %.6s", i, b);
    }
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    say("server: EOF after the half-close %d", read(c, b, 1) == 0);
    write_all(c, "last", 4);
    read_exact(s, b, 4);
    say("parent: after the half-close %.4s", b);
    close(c);
    say("parent: EOF %d", read(s, b, 1) == 0);
    close(s);
    close(l);
    return 0;
}
