"""A caller of tollgate in five calls: check a rate limit, count a message,
read the conversation's usage, and pay for a model call after use (reserve the
most tokens it may take, then settle what it really took).

    python client.py --addr 127.0.0.1:50051

One line per step, ``step key=value ...``; a failed call prints
``error step=NAME code=CODE message=...`` on stderr and exits 1. The server
needs an ``api`` rule, a ``tokens`` rule and a ``text`` quota kind, as
../tollgate.toml has.
"""

import argparse
import sys
import uuid

import grpc

import stubs

rate_pb2, rate_grpc, quota_pb2, quota_grpc = stubs.load()

# A caller of a rate limiter must never wait on it for long.
TIMEOUT_S = 2.0


def flag(value: bool) -> str:
    """Booleans as the Node client prints them, so both read alike."""
    return "true" if value else "false"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--subject", default="user-42")
    parser.add_argument("--user", default="user-42")
    parser.add_argument("--character", default="luna")
    parser.add_argument("--max-tokens", type=int, default=4000)
    parser.add_argument("--used-tokens", type=int, default=1234)
    args = parser.parse_args()

    step = "check"
    with grpc.insecure_channel(args.addr) as channel:
        rate = rate_grpc.RateLimiterStub(channel)
        quota = quota_grpc.UsageQuotaStub(channel)
        try:
            # May this subject make one more API call?
            check = rate.CheckLimit(
                rate_pb2.CheckLimitRequest(rule="api", subject=args.subject),
                timeout=TIMEOUT_S,
            )
            print(
                f"check allowed={flag(check.allowed)} limit={check.limit}"
                f" remaining={check.remaining}",
                flush=True,
            )

            # Count one text message in the user's conversation with a character.
            step = "increment"
            inc = quota.IncrementUsage(
                quota_pb2.IncrementUsageRequest(
                    user_id=args.user, character_id=args.character, kind="text"
                ),
                timeout=TIMEOUT_S,
            )
            print(
                f"increment allowed={flag(inc.allowed)} used={inc.used}"
                f" limit={inc.limit} remaining={inc.remaining}",
                flush=True,
            )

            # Read that conversation's counters back.
            step = "usage"
            usage = quota.GetUsage(
                quota_pb2.GetUsageRequest(user_id=args.user, character_id=args.character),
                timeout=TIMEOUT_S,
            )
            text = next((c for c in usage.counters if c.kind == "text"), None)
            if text is None:
                raise RuntimeError("GetUsage answered no `text` counter")
            print(
                f"usage kind=text used={text.used} limit={text.limit}"
                f" remaining={text.remaining}",
                flush=True,
            )

            # Pay after use: reserve the most tokens the model call may take,
            # under a request_id (a retry of this reserve is not charged twice)...
            step = "reserve"
            request_id = str(uuid.uuid4())
            reserve = rate.CheckLimit(
                rate_pb2.CheckLimitRequest(
                    rule="tokens",
                    subject=args.subject,
                    cost=args.max_tokens,
                    request_id=request_id,
                ),
                timeout=TIMEOUT_S,
            )
            print(
                f"reserve allowed={flag(reserve.allowed)} limit={reserve.limit}"
                f" remaining={reserve.remaining}",
                flush=True,
            )
            if not reserve.allowed:
                return 0  # over budget: the model call does not run

            # ...run the model, then settle what it really used: the rest of
            # the reservation is given back at once.
            step = "settle"
            settle = rate.SettleLimit(
                rate_pb2.SettleLimitRequest(
                    rule="tokens",
                    subject=args.subject,
                    request_id=request_id,
                    actual_cost=args.used_tokens,
                ),
                timeout=TIMEOUT_S,
            )
            print(f"settle found={flag(settle.found)} remaining={settle.remaining}", flush=True)
        except grpc.RpcError as err:
            print(
                f"error step={step} code={err.code().name} message={err.details()}",
                file=sys.stderr,
            )
            return 1
        except RuntimeError as err:
            print(f"error step={step} code=none message={err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
