/* One side of a connection per process, for mixing a program under ivcom with one that is
 * not: `t_split server PORTFILE` accepts one connection and echoes it; `t_split client PORT
 * [HOST]` sends 1 MiB in request/response pieces and checks every echo. */
#include "common.h"

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && strcmp(argv[1], "server") == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_ANY);
        CHECK(bind(s, (struct sockaddr *)&a, sizeof a) == 0, "bind");
        CHECK(listen(s, 8) == 0, "listen");
        socklen_t len = sizeof a;
        getsockname(s, (struct sockaddr *)&a, &len);
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", argv[2]);
        FILE *f = fopen(tmp, "w");
        fprintf(f, "%d\n", ntohs(a.sin_port));
        fclose(f);
        rename(tmp, argv[2]);
        int c = accept(s, NULL, NULL);
        CHECK(c >= 0, "accept");
        char b[65536];
        size_t total = 0;
        for (;;) {
            ssize_t n = read(c, b, sizeof b);
            if (n == 0) break;
            CHECK(n > 0, "read");
            write_all(c, b, (size_t)n);
            total += (size_t)n;
        }
        say("server: echoed %zu bytes", total);
        close(c);
        close(s);
        return 0;
    }
    if (argc >= 3 && strcmp(argv[1], "client") == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)atoi(argv[2]));
        inet_pton(AF_INET, argc >= 4 ? argv[3] : "127.0.0.1", &a.sin_addr);
        CHECK(connect(s, (struct sockaddr *)&a, sizeof a) == 0, "connect");
        unsigned char q[4096], r[4096];
        size_t total = 0;
        for (int i = 0; total < (1u << 20); i++) {
            size_t n = 1 + (size_t)(i * 37) % sizeof q;
            fill(q, n, (uint32_t)i);
            write_all(s, q, n);
            read_exact(s, r, n);
            CHECK(memcmp(q, r, n) == 0, "echo %d", i);
            total += n;
        }
        CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
        CHECK(read(s, r, 1) == 0, "EOF");
        say("client: %zu bytes echoed intact", total);
        close(s);
        return 0;
    }
    fprintf(stderr, "usage: t_split server PORTFILE | t_split client PORT [HOST]\n");
    return 2;
}
