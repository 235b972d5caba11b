/* Connections handed back to TCP, with nothing lost, duplicated or reordered, when a program
 * does what the library cannot follow: an inetd-style server execs a handler without the
 * library on the connection (stdin/stdout, stdio), with the client's request already sent
 * into shared memory before the exec; stdio on a connection (fdopen); a connection sent to
 * another process over SCM_RIGHTS; and the handler of the exec'd image answering with a
 * large transfer each way. The client side stays under the library throughout.
 *
 *   t_handback            the test (server and client)
 *   t_handback handler    the exec'd handler: a line on stdin, answer on stdout, then a
 *                         1 MiB block whose checksum it sends back, then 1 MiB of its own */
#include "common.h"
#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/sockios.h>

extern char **environ;

#define BIG (1 << 20)

static void handler(void) {
    char line[128];
    if (!fgets(line, sizeof line, stdin)) _exit(3);
    printf("handler got: %s", line);
    fflush(stdout);
    unsigned char *b = malloc(BIG);
    if (fread(b, 1, BIG, stdin) != BIG) _exit(4);
    printf("checksum %016llx\n", (unsigned long long)fnv(b, BIG, 0));
    fill(b, BIG, 7);
    fwrite(b, 1, BIG, stdout);
    fflush(stdout);
    free(b);
    _exit(0);
}

/* The environment without LD_PRELOAD: the handler runs without the library. */
static char **without_preload(void) {
    size_t n = 0;
    while (environ[n]) n++;
    char **e = calloc(n + 1, sizeof *e);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "LD_PRELOAD=", 11) != 0) e[k++] = environ[i];
    return e;
}

static char self_path[4096];

/* One line (without its newline) read a byte at a time through read(). */
static void read_line(int s, char *line, size_t n) {
    size_t k = 0;
    while (k + 1 < n) {
        read_exact(s, line + k, 1);
        if (line[k] == '\n') break;
        k++;
    }
    line[k] = 0;
}

static void client(int port) {
    unsigned char *b = malloc(BIG);
    char line[128];
    /* (a) inetd style: the request goes out (through shared memory: the server answered
     * once first) before the server's handler exists. */
    int s = connect_to(0, port, 0);
    write_all(s, "hi", 2);
    read_exact(s, line, 2);
    write_all(s, "request one\n", 12);
    read_line(s, line, sizeof line);
    say("client: %s", line);
    fill(b, BIG, 3);
    write_all(s, b, BIG);
    read_line(s, line, sizeof line);
    unsigned long long want = (unsigned long long)fnv(b, BIG, 0);
    unsigned long long got = strtoull(line + 9, NULL, 16);
    say("client: handler's checksum of our 1 MiB matches: %d", got == want);
    read_exact(s, b, BIG);
    unsigned char *w = malloc(BIG);
    fill(w, BIG, 7);
    say("client: handler's 1 MiB intact: %d", memcmp(b, w, BIG) == 0);
    free(w);
    close(s);

    /* (b) stdio on the server's end; our end stays with the library. */
    s = connect_to(0, port, 0);
    write_all(s, "via stdio\n", 10);
    read_exact(s, line, 9);
    say("client: stdio answer: %.9s", line);
    close(s);

    /* (c) the server passes its end to another process over SCM_RIGHTS. */
    s = connect_to(0, port, 0);
    write_all(s, "before pass", 11);
    read_exact(s, line, 8);
    say("client: answer from the receiving process: %.8s", line);
    write_all(s, "after", 5);
    read_exact(s, line, 5);
    say("client: echo of what we sent after the pass: %.5s", line);
    close(s);
    free(b);
}

static void send_fd(int sock, int fd) {
    char c = 'F';
    struct iovec iov = {&c, 1};
    char ctl[CMSG_SPACE(sizeof(int))];
    memset(ctl, 0, sizeof ctl);
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof fd);
    CHECK(sendmsg(sock, &m, 0) == 1, "sendmsg SCM_RIGHTS");
}

static int recv_fd(int sock) {
    char c;
    struct iovec iov = {&c, 1};
    char ctl[CMSG_SPACE(sizeof(int))];
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = ctl;
    m.msg_controllen = sizeof ctl;
    CHECK(recvmsg(sock, &m, 0) == 1, "recvmsg SCM_RIGHTS");
    int fd;
    memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof fd);
    return fd;
}

static void server(int l) {
    /* A process that will receive a connection over SCM_RIGHTS, started beforehand. */
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    fflush(stdout);
    pid_t recv_pid = fork();
    if (recv_pid == 0) {
        close(sv[0]);
        close(l);
        int c = recv_fd(sv[1]);
        char b[16];
        read_exact(c, b, 11);
        write_all(c, b[0] == 'b' ? "received" : "wrongdat", 8);
        read_exact(c, b, 5);
        write_all(c, b, 5);
        close(c);
        _exit(0);
    }
    close(sv[1]);

    /* (a) inetd style: wait until the request is in, then exec the handler on it. */
    int c = accept_one(l);
    char hi[2];
    read_exact(c, hi, 2);
    write_all(c, "ok", 2);
    msleep(200);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(c, 0);
        dup2(c, 1);
        close(c);
        char *argv[] = {self_path, "handler", NULL};
        execve(self_path, argv, without_preload());
        _exit(127);
    }
    close(c);
    int st;
    waitpid(pid, &st, 0);
    say("server: handler exited %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);

    /* (b) stdio on an accelerated connection. */
    c = accept_one(l);
    FILE *f = fdopen(c, "r+");
    char line[64];
    CHECK(fgets(line, sizeof line, f) != NULL, "fgets");
    fprintf(f, "got %.5s", line);
    fflush(f);
    fclose(f);

    /* (c) hand the connection to the other process. */
    c = accept_one(l);
    msleep(100);
    send_fd(sv[0], c);
    close(c);
    waitpid(recv_pid, &st, 0);
    say("server: receiving process exited %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    close(sv[0]);
}

/* A process holding both ends: it writes a request, runs a shell on the other end as its
 * standard input and output, and only waits for the shell to end (it never touches the
 * connection meanwhile): the shell still gets the request written before its exec. */
static void shell_on_own_connection(void) {
    int c, s;
    local_pair(&c, &s);
    write_all(c, "request two\n", 12);
    fflush(stdout);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        CHECK(dup2(s, 0) == 0 && dup2(s, 1) == 1, "dup2");
        execl("/bin/sh", "sh", "-c", "read l; echo \"sh got: $l\"", (char *)NULL);
        _exit(127);
    }
    alarm(30);
    int st;
    CHECK(waitpid(p, &st, 0) == p, "waitpid");
    alarm(0);
    say("own connection: shell exited %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    char line[64];
    read_line(c, line, sizeof line);
    say("own connection: answer: %s", line);
    close(c);
    close(s);
}

/* The peer writes 200 KB and closes; only then does this end meet something the library
 * hands back for (SO_RCVLOWAT above 1, then an ioctl it does not know): every byte the peer
 * wrote is still read, then EOF. And the other way round (below). */
static void after_peer_closed(void) {
    for (int round = 0; round < 2; round++) {
        int c, s;
        local_pair(&c, &s);
        static unsigned char out[200000], in[200001];
        fill(out, sizeof out, 11 + (uint32_t)round);
        write_all(s, out, sizeof out);
        close(s);
        msleep(50);
        if (round == 0) {
            int two = 2;
            CHECK(setsockopt(c, SOL_SOCKET, SO_RCVLOWAT, &two, sizeof two) == 0, "SO_RCVLOWAT");
        } else {
            int q = 0;
            CHECK(ioctl(c, FIONREAD, &q) == 0, "FIONREAD");
            struct timeval tv;
            (void)ioctl(c, SIOCGSTAMP, &tv);
        }
        size_t got = 0;
        ssize_t r;
        while ((r = read(c, in + got, sizeof in - got)) > 0) got += (size_t)r;
        say("peer closed, then %s: %zu bytes intact %d, then EOF %d", round == 0 ? "SO_RCVLOWAT" : "ioctls", got,
            got == sizeof out && memcmp(in, out, got) == 0, r == 0);
        close(c);
    }
    /* The other way round: this end hands back while the peer (another process) has not
     * read its ring to the end, and the peer closes at once, without another call on the
     * connection: what it did not read still arrives. */
    int c, s, go[2];
    local_pair(&c, &s);
    CHECK(pipe(go) == 0, "pipe");
    static unsigned char out[300000], in[300001];
    fill(out, sizeof out, 21);
    fflush(stdout);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        close(c);
        write_all(s, out, sizeof out);
        char b;
        CHECK(read(go[0], &b, 1) == 1, "go");
        close(s);
        _exit(0);
    }
    close(s);
    msleep(100);
    struct timeval tv;
    (void)ioctl(c, SIOCGSTAMP, &tv);
    write_all(go[1], "g", 1);
    size_t got = 0;
    ssize_t r;
    while ((r = read(c, in + got, sizeof in - got)) > 0) got += (size_t)r;
    int st;
    CHECK(waitpid(p, &st, 0) == p, "waitpid");
    say("handed back, then the peer closed: %zu bytes intact %d, then EOF %d", got,
        got == sizeof out && memcmp(in, out, got) == 0, r == 0);
    close(c);
    close(go[0]);
    close(go[1]);
}

/* inetd style: a child puts the connection on its stdin and stdout and execs a program
 * without the library (a clean environment), while bytes sent before the exec wait unread
 * in the ring and more follow at once from another thread of the peer, which then shuts
 * down for writing: cat echoes every byte in order, then EOF. */
static int cat_client;
static unsigned char cat_out[300000];
static void *cat_writer(void *arg) {
    (void)arg;
    write_all(cat_client, "after|", 6);
    write_all(cat_client, cat_out, sizeof cat_out);
    CHECK(shutdown(cat_client, SHUT_WR) == 0, "shutdown");
    return NULL;
}
static void cat_with_bytes_in_flight(void) {
    int c, s;
    local_pair(&c, &s);
    write_all(c, "before|", 7);
    msleep(20);
    fflush(stdout);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        CHECK(dup2(s, 0) == 0 && dup2(s, 1) == 1, "dup2");
        close(s);
        close(c);
        char *argv[] = {"cat", NULL}, *envp[] = {"PATH=/usr/bin:/bin", NULL};
        execve("/bin/cat", argv, envp);
        _exit(127);
    }
    close(s);
    fill(cat_out, sizeof cat_out, 31);
    cat_client = c;
    pthread_t t;
    CHECK(pthread_create(&t, NULL, cat_writer, NULL) == 0, "pthread_create");
    static unsigned char in[400000];
    size_t got = 0;
    ssize_t r;
    while ((r = read(c, in + got, sizeof in - got)) > 0) got += (size_t)r;
    pthread_join(t, NULL);
    int st;
    CHECK(waitpid(p, &st, 0) == p, "waitpid");
    int ok = got == 13 + sizeof cat_out && memcmp(in, "before|after|", 13) == 0 && memcmp(in + 13, cat_out, sizeof cat_out) == 0;
    say("cat (no library) on the connection: %zu bytes echoed in order %d, then EOF %d, cat exited %d", got, ok, r == 0,
        WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    close(c);
}

/* inetd style once more, with the peer done sending: it writes its request and shuts
 * down for writing before the server runs a shell on the connection (the shell's stdin and
 * stdout; the new image runs under the library but hands the connection back for stdio):
 * the shell reads the whole request, and the peer reads the shell's answer, then EOF. */
static void halfclosed_client(int port) {
    int s = connect_to(0, port, 0);
    write_all(s, "request three\nmore\n", 19);
    CHECK(shutdown(s, SHUT_WR) == 0, "shutdown");
    char in[128];
    size_t got = 0;
    ssize_t r;
    while ((r = read(s, in + got, sizeof in - 1 - got)) > 0) got += (size_t)r;
    in[got] = 0;
    for (char *p = in; *p; p++)
        if (*p == '\n') *p = '|';
    say("half-closed peer: the shell answered '%s', then EOF %d", in, r == 0);
    close(s);
}

static void shell_server(int l) {
    int c = accept_one(l);
    msleep(100); /* the request and the FIN are in before the shell starts */
    fflush(stdout);
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        CHECK(dup2(c, 0) == 0 && dup2(c, 1) == 1, "dup2");
        close(c);
        execl("/bin/sh", "sh", "-c", "read l; echo \"sh got: $l\"; cat", (char *)NULL);
        _exit(127);
    }
    close(c);
    int st;
    CHECK(waitpid(p, &st, 0) == p, "waitpid");
}

/* Socket activation: a manager listens, never accepts, and runs the service (this program
 * again, exec'd under the library) with the listener on fd 3; clients write and close; the
 * service reads each connection to its EOF. */
#define ACTIVATED 3
static void service(void) {
    for (int i = 0; i < ACTIVATED; i++) {
        int c = accept(3, NULL, NULL);
        if (c < 0) _exit(5);
        char b[64];
        ssize_t r, n = 0;
        while ((r = read(c, b, sizeof b)) > 0) n += r;
        say("service: connection %d: %zd bytes, then EOF %d", i, n, r == 0);
        close(c);
    }
    _exit(0);
}

static void activation(void) {
    int port;
    int l = listen_any(0, &port);
    fflush(stdout);
    pid_t svc = fork();
    CHECK(svc >= 0, "fork");
    if (svc == 0) {
        CHECK(dup2(l, 3) == 3, "dup2");
        char *argv[] = {self_path, "service", NULL};
        execv(self_path, argv);
        _exit(127);
    }
    for (int i = 0; i < ACTIVATED; i++) {
        int c = connect_to(0, port, 0);
        write_all(c, "12345", 5);
        close(c);
    }
    int st = -1;
    for (int i = 0; i < 300 && waitpid(svc, &st, WNOHANG) == 0; i++) msleep(100);
    if (!WIFEXITED(st)) {
        kill(svc, SIGKILL);
        waitpid(svc, &st, 0);
    }
    say("activation: service exited %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    close(l);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "handler") == 0) handler();
    if (argc > 1 && strcmp(argv[1], "service") == 0) service();
    CHECK(realpath("/proc/self/exe", self_path) != NULL, "realpath");
    signal(SIGPIPE, SIG_IGN);
    pair(0, server, client);
    shell_on_own_connection();
    after_peer_closed();
    cat_with_bytes_in_flight();
    pair(0, shell_server, halfclosed_client);
    activation();
    return 0;
}
