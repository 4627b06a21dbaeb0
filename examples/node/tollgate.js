// tollgate's gRPC clients for Node.js, built at run time from the project's
// own protos (../../proto) by @grpc/proto-loader: no generated code to keep
// in step with the contract.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'proto');

const definition = protoLoader.loadSync(
  ['tollgate/v1/rate_limiter.proto', 'tollgate/v1/usage_quota.proto'],
  {
    includeDirs: [PROTO_ROOT],
    // Field names as the proto writes them (retry_after, request_id).
    keepCase: true,
    // uint64 counts as decimal strings: a JavaScript number would round
    // past 2^53.
    longs: String,
    // Unset fields read as their zero values, as in every other language.
    defaults: true,
  },
);
const v1 = grpc.loadPackageDefinition(definition).tollgate.v1;

/** Clients of both services at `addr` (host:port), over plaintext. */
function connect(addr) {
  const credentials = grpc.credentials.createInsecure();
  return {
    rate: new v1.RateLimiter(addr, credentials),
    quota: new v1.UsageQuota(addr, credentials),
  };
}

/**
 * Calls `method` on `client` with a deadline: a caller of a rate limiter
 * must never wait on it for long.
 */
function call(client, method, request, timeoutMs = 2000) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, answer) =>
      err ? reject(err) : resolve(answer),
    );
  });
}

/** A google.protobuf.Duration in whole seconds, rounded up (Retry-After). */
function ceilSeconds(duration) {
  if (!duration) return 0;
  const seconds = Number(duration.seconds);
  return duration.nanos > 0 ? seconds + 1 : seconds;
}

module.exports = { connect, call, ceilSeconds, grpc };
