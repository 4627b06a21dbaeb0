#!/usr/bin/env node
// Express middleware that asks tollgate before every request and answers
// with the standard RateLimit headers (draft-ietf-httpapi-ratelimit-headers):
// `RateLimit-Policy` and `RateLimit` as tollgate wrote them, `Retry-After`
// in whole seconds when denied, and 429 Too Many Requests.
//
//   node http-middleware.js --addr 127.0.0.1:50051 --listen 127.0.0.1:8080
//   curl -i -H 'X-API-Key: k1' http://127.0.0.1:8080/
//
// Prints `listening http://HOST:PORT` once it accepts requests (port 0: any
// free port).
'use strict';

const express = require('express');
const { parseArgs } = require('node:util');
const { connect, call, ceilSeconds, grpc } = require('./tollgate');

/**
 * Limits each caller under `rule`: the caller is its API key (header
 * X-API-Key) or else its IP address, prefixed so that a key can never be
 * counted as an address. When tollgate itself cannot be reached, `failOpen`
 * lets the request through (tollgate already answers by the rule's
 * on_store_error when its store fails; this is for tollgate being down).
 */
function rateLimit({ client, rule, failOpen = true }) {
  return (req, res, next) => {
    const key = req.get('x-api-key');
    const subject = key ? `key:${key}` : `ip:${req.ip}`;
    call(client, 'CheckLimit', { rule, subject }, 500).then(
      (answer) => {
        if (answer.ratelimit_policy) res.set('RateLimit-Policy', answer.ratelimit_policy);
        if (answer.ratelimit) res.set('RateLimit', answer.ratelimit);
        if (answer.allowed) return next();
        res.set('Retry-After', String(ceilSeconds(answer.retry_after)));
        res.status(429).send('Too Many Requests\n');
      },
      (err) => {
        // A subject tollgate refuses (say, a key over 256 bytes) is the
        // caller's fault: never let it skip the limit.
        if (err.code === grpc.status.INVALID_ARGUMENT) {
          return res.status(400).send('Bad Request\n');
        }
        console.error(`tollgate: ${err.message}`);
        if (failOpen) return next();
        res.status(503).send('Service Unavailable\n');
      },
    );
  };
}

function main() {
  const { values: args } = parseArgs({
    options: {
      addr: { type: 'string', default: '127.0.0.1:50051' },
      listen: { type: 'string', default: '127.0.0.1:8080' },
      rule: { type: 'string', default: 'api' },
    },
  });
  const { rate } = connect(args.addr);
  const app = express();
  app.use(rateLimit({ client: rate, rule: args.rule }));
  app.get('/', (req, res) => res.send('hello\n'));

  const split = args.listen.lastIndexOf(':');
  const host = args.listen.slice(0, split);
  const server = app.listen(Number(args.listen.slice(split + 1)), host, () => {
    const { address, port } = server.address();
    console.log(`listening http://${address}:${port}`);
  });
  server.on('error', (err) => {
    console.error(`cannot listen on ${args.listen}: ${err.message}`);
    process.exit(1);
  });
}

if (require.main === module) main();

module.exports = { rateLimit };
