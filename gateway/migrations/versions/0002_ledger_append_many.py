"""ledger_append_many: several ledger appends under one hold of the head, on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

Concurrent commits on one gateway record their steps in one statement (one transaction,
one WAL flush: gateway/commits/batched.py). Their ledger entries are chained here, in
the order given: the head row is locked once, each entry hashed onto the one before,
the entries inserted, and the head moved to the last. Written by hand:
`scripts/regen-migration` regenerates 0001 only. SQLite needs no such function: there
the gateway appends in Python (gateway/ledger.py).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# hash_n = SHA-256(canonical document_n || bytes of hash_{n-1}), as in gateway/ledger.py;
# each document comes split around its `seq` value, which only the head knows:
# prefix || seq || suffix. Each statement of a PL/pgSQL function takes a new snapshot,
# so the UPDATE sees the head row as the SELECT ... FOR UPDATE locked it.
LEDGER_APPEND_MANY = """
CREATE OR REPLACE FUNCTION ledger_append_many(
    prefixes bytea[], suffixes bytea[], ats timestamptz[], events text[], actor_subs text[],
    actor_roles text[], task_ids text[], intent_ids text[], decision_ids text[], parents text[],
    request_digests text[], effect_digests text[], trace_ids text[], datas json[]
) RETURNS TABLE (entry_intent_id text, entry_seq bigint, entry_prev_hash text, entry_hash text)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    total integer := coalesce(cardinality(prefixes), 0);
    head_seq bigint;
    head_hash text;
    seqs bigint[] := '{}';
    prevs text[] := '{}';
    hashes text[] := '{}';
BEGIN
    IF total = 0 THEN
        RETURN;
    END IF;
    IF cardinality(suffixes) <> total OR cardinality(ats) <> total OR cardinality(events) <> total
       OR cardinality(actor_subs) <> total OR cardinality(actor_roles) <> total
       OR cardinality(task_ids) <> total OR cardinality(intent_ids) <> total
       OR cardinality(decision_ids) <> total OR cardinality(parents) <> total
       OR cardinality(request_digests) <> total OR cardinality(effect_digests) <> total
       OR cardinality(trace_ids) <> total OR cardinality(datas) <> total THEN
        RAISE EXCEPTION 'ledger_append_many: arrays of different lengths';
    END IF;
    SELECT head.seq, head.hash INTO head_seq, head_hash FROM ledger_head AS head WHERE head.id = 1 FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the ledger head row is missing; start the gateway once to create it';
    END IF;
    FOR i IN 1 .. total LOOP
        prevs[i] := head_hash;
        head_seq := head_seq + 1;
        head_hash := encode(sha256(prefixes[i] || convert_to(CAST(head_seq AS text), 'UTF8') || suffixes[i]
                                   || decode(head_hash, 'hex')), 'hex');
        seqs[i] := head_seq;
        hashes[i] := head_hash;
    END LOOP;
    UPDATE ledger_head AS head SET seq = head_seq, prev_hash = prevs[total], hash = head_hash
    WHERE head.id = 1;
    INSERT INTO ledger (seq, at, event, actor_sub, actor_role, task_id, intent_id, decision_id, parent,
                        request_digest, effect_digest, trace_id, data, prev_hash, hash)
    SELECT * FROM unnest(seqs, ats, events, actor_subs, actor_roles, task_ids, intent_ids, decision_ids,
                         parents, request_digests, effect_digests, trace_ids, datas, prevs, hashes);
    RETURN QUERY SELECT * FROM unnest(intent_ids, seqs, prevs, hashes);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(LEDGER_APPEND_MANY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_append_many")
