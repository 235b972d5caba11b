/* A line echo over TCP for the security tests: the real server answers "real:<line>".
 *   sec_echo server ADDR PORT DELAY_MS [N] accept N connections (default 1; the first after
 *                                        DELAY_MS), answer one line on each
 *   sec_echo client ADDR PORT MSG        send MSG and a newline, print the answer (non-printable
 *                                        bytes as \xNN) */
#include "common.h"

static void print_escaped(const char *b, ssize_t n) {
    for (ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)b[i];
        if (c >= 32 && c < 127) putchar(c);
        else printf("\\x%02x", c);
    }
    putchar('\n');
}

int main(int argc, char **argv) {
    if (argc != 5 && !(argc == 6 && strcmp(argv[1], "server") == 0)) {
        fprintf(stderr, "usage: sec_echo server ADDR PORT DELAY_MS [N] | client ADDR PORT MSG\n");
        return 2;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) CHECK(0, "address %s", argv[2]);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) CHECK(0, "socket");
    struct timeval tv = {.tv_sec = 10};
    if (strcmp(argv[1], "server") == 0) {
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) CHECK(0, "bind");
        if (listen(s, 16) < 0) CHECK(0, "listen");
        printf("listening\n");
        fflush(stdout);
        usleep(atoi(argv[4]) * 1000);
        for (int k = argc == 6 ? atoi(argv[5]) : 1; k > 0; k--) {
        int c = accept(s, NULL, NULL);
        if (c < 0) CHECK(0, "accept");
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char buf[512];
        ssize_t n = 0, r;
        while (n < (ssize_t)sizeof buf - 1 && (r = read(c, buf + n, sizeof buf - 1 - n)) > 0) {
            n += r;
            if (memchr(buf, '\n', n)) break;
        }
        char out[600];
        int len = snprintf(out, sizeof out, "real:%.*s", (int)n, buf);
        if (write(c, out, len) != len) CHECK(0, "write");
        printf("served: ");
        print_escaped(buf, n);
        fflush(stdout);
        while (read(c, buf, sizeof buf) > 0) {}
        close(c);
        }
        return 0;
    }
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) CHECK(0, "connect");
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char msg[300];
    int len = snprintf(msg, sizeof msg, "%s\n", argv[4]);
    if (write(s, msg, len) != len) CHECK(0, "write");
    char buf[512];
    ssize_t n = 0, r;
    while (n < (ssize_t)sizeof buf && (r = read(s, buf + n, sizeof buf - n)) > 0) {
        n += r;
        if (memchr(buf, '\n', n)) break;
    }
    if (n > 0 && buf[n - 1] == '\n') n--;
    print_escaped(buf, n);
    close(s);
    return 0;
}
