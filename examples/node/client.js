#!/usr/bin/env node
// A caller of tollgate in five calls: check a rate limit, count a message,
// read the conversation's usage, and pay for a model call after use
// (reserve the most tokens it may take, then settle what it really took).
//
//   node client.js --addr 127.0.0.1:50051
//
// One line per step, `step key=value ...`; a failed call prints
// `error step=NAME code=CODE message=...` on stderr and exits 1.
// The server needs an `api` rule, a `tokens` rule and a `text` quota kind,
// as ../tollgate.toml has.
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const { connect, call, grpc } = require('./tollgate');

const { values: args } = parseArgs({
  options: {
    addr: { type: 'string', default: '127.0.0.1:50051' },
    subject: { type: 'string', default: 'user-42' },
    user: { type: 'string', default: 'user-42' },
    character: { type: 'string', default: 'luna' },
    'max-tokens': { type: 'string', default: '4000' },
    'used-tokens': { type: 'string', default: '1234' },
  },
});

async function main() {
  const { rate, quota } = connect(args.addr);
  let step = 'check';
  try {
    // May this subject make one more API call?
    const check = await call(rate, 'CheckLimit', { rule: 'api', subject: args.subject });
    console.log(`check allowed=${check.allowed} limit=${check.limit} remaining=${check.remaining}`);

    // Count one text message in the user's conversation with a character.
    step = 'increment';
    const conversation = { user_id: args.user, character_id: args.character };
    const inc = await call(quota, 'IncrementUsage', { ...conversation, kind: 'text' });
    console.log(
      `increment allowed=${inc.allowed} used=${inc.used} limit=${inc.limit} remaining=${inc.remaining}`,
    );

    // Read that conversation's counters back.
    step = 'usage';
    const usage = await call(quota, 'GetUsage', conversation);
    const text = usage.counters.find((counter) => counter.kind === 'text');
    if (!text) throw new Error('GetUsage answered no `text` counter');
    console.log(
      `usage kind=text used=${text.used} limit=${text.limit} remaining=${text.remaining}`,
    );

    // Pay after use: reserve the most tokens the model call may take, under a
    // request_id (a retry of this reserve is not charged twice)...
    step = 'reserve';
    const requestId = randomUUID();
    const reserve = await call(rate, 'CheckLimit', {
      rule: 'tokens',
      subject: args.subject,
      cost: Number(args['max-tokens']),
      request_id: requestId,
    });
    console.log(
      `reserve allowed=${reserve.allowed} limit=${reserve.limit} remaining=${reserve.remaining}`,
    );
    if (!reserve.allowed) return; // over budget: the model call does not run

    // ...run the model, then settle what it really used: the rest of the
    // reservation is given back at once.
    step = 'settle';
    const settle = await call(rate, 'SettleLimit', {
      rule: 'tokens',
      subject: args.subject,
      request_id: requestId,
      actual_cost: Number(args['used-tokens']),
    });
    console.log(`settle found=${settle.found} remaining=${settle.remaining}`);
  } catch (err) {
    const code = err.code === undefined ? 'none' : grpc.status[err.code];
    console.error(`error step=${step} code=${code} message=${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    rate.close();
    quota.close();
  }
}

main();
