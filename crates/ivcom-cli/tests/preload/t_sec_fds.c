/* Security: descriptor numbers are not identities. A socket closed behind the library's
 * back, or closed by one thread while another is blocked on it, must not let a file that
 * gets its number exchange data with the peer.
 *
 * Usage: t_sec_fds fclose FILE   an accepted socket is fdopen()ed and fclose()d; a file
 *                                opened at the same number is written and read back.
 *        t_sec_fds async FILE    a thread blocks in read() on the socket; another closes
 *                                it and makes a socket pair whose first end gets that
 *                                number, with data waiting in it; then the peer sends.
 *                                (FILE is unused.) */
#include "common.h"
#include <pthread.h>

#define PEER "PEERDATA"
#define FDATA "file-data\n"

static const char *g_mode, *g_file;

static void file_report(int fd_number) {
    char b[64] = {0};
    int f = open(g_file, O_RDONLY);
    CHECK(f >= 0, "open for report");
    ssize_t n = read(f, b, sizeof b - 1);
    close(f);
    b[n > 0 ? n : 0] = 0;
    for (char *p = b; *p; p++)
        if (*p == '\n') *p = '|';
    say("server: file at the socket's old number %d, holds '%s'", fd_number, b);
}

static void fclose_case(int c) {
    char b[64];
    read_exact(c, b, 2);
    FILE *f = fdopen(c, "r+");
    CHECK(f != NULL, "fdopen");
    CHECK(fclose(f) == 0, "fclose");
    int fd = open(g_file, O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0, "open");
    write_all(fd, FDATA, strlen(FDATA));
    CHECK(lseek(fd, 0, SEEK_SET) == 0, "lseek");
    /* What reading the number returns: the file's bytes. */
    ssize_t n = read(fd, b, sizeof b - 1);
    b[n > 0 ? n : 0] = 0;
    for (char *p = b; *p; p++)
        if (*p == '\n') *p = '|';
    say("server: read at the number returned %zd bytes '%s'", n, b);
    close(fd);
    file_report(fd == c);
}

static int g_sock;
static void *blocked_reader(void *arg) {
    (void)arg;
    char b[64];
    ssize_t n = read(g_sock, b, sizeof b - 1);
    b[n > 0 ? n : 0] = 0;
    say("server: the blocked read returned %zd bytes '%s'", n, b);
    return NULL;
}

static void async_case(int c) {
    char b[64];
    read_exact(c, b, 2);
    g_sock = c;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, blocked_reader, NULL) == 0, "pthread_create");
    msleep(300);
    CHECK(close(c) == 0, "close");
    /* The number comes back for a local socket pair with data of its own waiting. */
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    write_all(sv[1], "PAIRDATA", 8);
    CHECK(pthread_join(t, NULL) == 0, "join");
    ssize_t n = recv(sv[0], b, sizeof b - 1, MSG_DONTWAIT);
    b[n > 0 ? n : 0] = 0;
    say("server: the pair's end at the socket's old number %d holds '%s'", sv[0] == c, b);
    n = recv(sv[1], b, sizeof b - 1, MSG_DONTWAIT);
    say("server: bytes that reached the pair's other end: %zd", n > 0 ? n : 0);
    close(sv[0]);
    close(sv[1]);
}

static void server(int l) {
    int c = accept_one(l);
    if (strcmp(g_mode, "fclose") == 0)
        fclose_case(c);
    else
        async_case(c);
}

static void client(int port) {
    int s = connect_to(0, port, 0);
    write_all(s, "hi", 2);
    msleep(700);
    (void)send(s, PEER, strlen(PEER), MSG_NOSIGNAL);
    char b[256];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, b + got, sizeof b - 1 - got);
        if (r <= 0) break;
        got += (size_t)r;
        if (got == sizeof b - 1) break;
    }
    b[got] = 0;
    say("client: received %zu bytes from the server before the end '%s'", got, b);
    close(s);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    CHECK(argc == 3, "usage: t_sec_fds fclose|async FILE");
    g_mode = argv[1];
    g_file = argv[2];
    pair(0, server, client);
    say("done");
    return 0;
}
