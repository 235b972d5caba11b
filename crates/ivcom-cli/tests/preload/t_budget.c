/* Descriptor budget and the message-vector calls: with the soft RLIMIT_NOFILE lowered to 64,
 * a server and a client each hold 40 connections at once (the library's own descriptors do
 * not count against the program); recvmmsg splits a stream into fixed-size messages and
 * sendmmsg's messages arrive in order; dprintf writes through the connection. */
#include "common.h"
#include <sys/resource.h>

#define CONNS 40

/* Three 4-byte messages over the buffers x[0..3]. */
static void vectors(char x[3][4], struct iovec iv[3], struct mmsghdr mm[3]) {
    memset(mm, 0, 3 * sizeof *mm);
    for (int i = 0; i < 3; i++) {
        iv[i] = (struct iovec){x[i], 4};
        mm[i].msg_hdr.msg_iov = &iv[i];
        mm[i].msg_hdr.msg_iovlen = 1;
    }
}

static void limit64(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 64;
    CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "setrlimit");
}

static void client(int port) {
    limit64();
    int cs[CONNS], made = 0, answered = 0;
    for (int i = 0; i < CONNS; i++) {
        cs[i] = connect_to(0, port, 0);
        made++;
    }
    for (int i = 0; i < CONNS; i++) {
        char m[4] = {'q', (char)('0' + i % 10), 0, 0}, b[4];
        write_all(cs[i], m, 4);
        read_exact(cs[i], b, 4);
        answered += b[0] == 'a' && b[1] == m[1];
    }
    say("client: %d connections made, %d answered under RLIMIT_NOFILE 64", made, answered);
    /* Message vectors on the first connection. */
    int s = cs[0];
    write_all(s, "abcdefghijkl", 12);
    char x[3][4] = {{'M', 'N', 'O', 'P'}, {'Q', 'R', 'S', 'T'}, {'U', 'V', 'W', 'X'}};
    struct iovec iv[3];
    struct mmsghdr mm[3];
    vectors(x, iv, mm);
    int n = sendmmsg(s, mm, 3, 0);
    say("client: sendmmsg: %d messages", n);
    n = dprintf(s, "dprintf %05d|", 42);
    say("client: dprintf: %d bytes", n);
    for (int i = 0; i < CONNS; i++) close(cs[i]);
}

static void server(int l) {
    limit64();
    int cs[CONNS], got = 0;
    for (int i = 0; i < CONNS; i++) {
        cs[i] = accept(l, NULL, NULL);
        if (cs[i] < 0) {
            say("server: accept %d failed: %s", i, strerror(errno));
            exit(1);
        }
        got++;
    }
    for (int i = 0; i < CONNS; i++) {
        char b[4];
        read_exact(cs[i], b, 4);
        b[0] = 'a';
        write_all(cs[i], b, 4);
    }
    say("server: %d connections accepted under RLIMIT_NOFILE 64", got);
    int c = cs[0];
    char x[3][4];
    struct iovec iv[3];
    struct mmsghdr mm[3];
    vectors(x, iv, mm);
    int n = recvmmsg(c, mm, 3, MSG_WAITALL, NULL);
    say("server: recvmmsg: %d messages of %u %u %u bytes: %.4s %.4s %.4s", n, mm[0].msg_len, mm[1].msg_len,
        mm[2].msg_len, x[0], x[1], x[2]);
    char y[12];
    read_exact(c, y, 12);
    say("server: sendmmsg's messages arrived in order: %.12s", y);
    char z[14];
    read_exact(c, z, 14);
    say("server: dprintf's text arrived: %.14s", z);
    for (int i = 0; i < CONNS; i++) close(cs[i]);
}

/* Both ends in this process, after lowering the soft limit from a larger one (with a
 * connection already open): as many connections fit as over TCP, up to EMFILE. */
static void fill_budget(void) {
    int c0, s0;
    local_pair(&c0, &s0);
    struct rlimit old;
    getrlimit(RLIMIT_NOFILE, &old);
    limit64();
    int port;
    int l = listen_any(0, &port);
    int fds[128], n = 0, pairs = 0;
    for (int i = 0; i < 60; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0) break;
        fds[n++] = c;
        struct sockaddr_storage ss;
        socklen_t len = loopback(0, port, &ss);
        if (connect(c, (struct sockaddr *)&ss, len) != 0) break;
        int s = accept(l, NULL, NULL);
        if (s < 0) break;
        fds[n++] = s;
        char b;
        write_all(c, "p", 1);
        read_exact(s, &b, 1);
        write_all(s, "q", 1);
        read_exact(c, &b, 1);
        pairs++;
    }
    say("budget: %d connection pairs in one process under RLIMIT_NOFILE 64 (EMFILE at the end %d)", pairs,
        errno == EMFILE);
    for (int i = 0; i < n; i++) close(fds[i]);
    close(l);
    close(c0);
    close(s0);
    CHECK(setrlimit(RLIMIT_NOFILE, &old) == 0, "setrlimit");
}

int main(void) {
    pair(0, server, client);
    fill_budget();
    return 0;
}
