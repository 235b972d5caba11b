// An HTTP server and client on Node.js (libuv's event loop over epoll; keep-alive).
//
//   node http_pair.js server PORTFILE [close-after-last]
//   node http_pair.js client PORT        exit 1 on a wrong answer
//
// The client makes GETs one after another over one keep-alive connection, then several at
// once (more connections), then POSTs a 1 MiB body the server answers with its SHA-256 and
// sends back. The server serves that many requests and then exits: once the client has closed
// every connection, or, with `close-after-last`, by calling `server.close()` right after its
// last `res.end()` (which in Node.js 19 and later also closes the connections that have no
// request in progress, the one whose 1 MiB answer is being written included).
'use strict';
const http = require('http');
const fs = require('fs');
const crypto = require('crypto');

const SEQUENTIAL = 200;
const PARALLEL = 16;
const TOTAL = 1 + SEQUENTIAL + PARALLEL + 1;

function body(i) {
  return `reply ${i} `.repeat(1 + (i % 50));
}

function server(portfile, requests, closeAfterLast) {
  let served = 0;
  let open = 0;
  const srv = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const data = Buffer.concat(chunks);
      if (req.method === 'POST') {
        res.setHeader('x-sha256', crypto.createHash('sha256').update(data).digest('hex'));
        res.end(data);
      } else {
        const i = Number(new URL(req.url, 'http://x').searchParams.get('i'));
        res.end(body(i));
      }
      served += 1;
      if (served === requests && closeAfterLast) done();
    });
  });
  const done = () => srv.close(() => console.log(`server: ${served} requests`));
  srv.on('connection', (sock) => {
    open += 1;
    sock.on('close', () => {
      open -= 1;
      if (open === 0 && served === requests && !closeAfterLast) done();
    });
  });
  srv.keepAliveTimeout = 30000;
  srv.listen(0, '127.0.0.1', () => {
    fs.writeFileSync(portfile + '.tmp', String(srv.address().port));
    fs.renameSync(portfile + '.tmp', portfile);
  });
}

function request(agent, port, method, path, payload) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(payload);
  });
}

async function client(port) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: PARALLEL });
  const check = (i, r) => {
    if (r.body.toString() !== body(i)) throw new Error(`request ${i}: wrong body ${r.body.toString().slice(0, 60)}`);
  };
  check(0, await request(agent, port, 'GET', '/?i=0'));
  for (let i = 1; i <= SEQUENTIAL; i++) check(i, await request(agent, port, 'GET', `/?i=${i}`));
  const par = [];
  for (let i = SEQUENTIAL + 1; i <= SEQUENTIAL + PARALLEL; i++) {
    par.push(request(agent, port, 'GET', `/?i=${i}`).then((r) => check(i, r)));
  }
  await Promise.all(par);
  const big = Buffer.alloc(1 << 20);
  for (let i = 0; i < big.length; i++) big[i] = (i * 131 + 7) & 255;
  const r = await request(agent, port, 'POST', '/big', big);
  const want = crypto.createHash('sha256').update(big).digest('hex');
  if (r.headers['x-sha256'] !== want || !r.body.equals(big)) throw new Error('the 1 MiB POST came back wrong');
  agent.destroy();
  console.log(`client: ${TOTAL} requests, every answer correct, 1 MiB POST intact`);
}

const [role, arg] = process.argv.slice(2);
if (role === 'server') server(arg, TOTAL, process.argv[4] === 'close-after-last');
else if (role === 'client') client(Number(arg)).catch((e) => { console.error(e); process.exit(1); });
else { console.error(`unknown role ${role}`); process.exit(2); }
