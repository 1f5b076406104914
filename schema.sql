-- The registry's schema. Applied at every boot, under an advisory lock, so
-- every statement here must be idempotent.
--
-- How the revision log works: every write to registry.instances passes
-- through the trigger registry.record_event(), which bumps the single-row
-- counter registry.revision and writes one row to registry.events in the same
-- transaction. The counter row stays locked until that transaction commits,
-- so the next writer waits for it: revisions are global, gap-free (a rollback
-- takes its number back) and in commit order. A reader that has seen revision
-- N and reads revision > N therefore misses nothing that commits later.
-- NOTIFY only wakes readers up; they read the rows themselves.

CREATE SCHEMA IF NOT EXISTS registry;

CREATE TABLE IF NOT EXISTS registry.revision (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    -- The newest revision written.
    revision bigint NOT NULL DEFAULT 0,
    -- Events up to this revision have been compacted away.
    compacted bigint NOT NULL DEFAULT 0
);
INSERT INTO registry.revision DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS registry.instances (
    name text NOT NULL,
    instance_id text NOT NULL,
    generation bigint NOT NULL DEFAULT 1,
    status text NOT NULL
        CHECK (status IN ('pending', 'active', 'inactive', 'draining')),
    address text NOT NULL,
    version text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    -- [{"name": "grpc", "port": 8090}, ...]
    apis jsonb NOT NULL DEFAULT '[]',
    -- [{"exchange": "...", "routing_key": "...", "type": "topic", "queue": "..."}]
    brokers jsonb NOT NULL DEFAULT '[]',
    metadata jsonb NOT NULL DEFAULT '{}',
    -- null: no health check.
    health_check jsonb,
    -- sha256 of the secret part of the current generation's token.
    token_hash bytea NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Revision of the last event of this entry; set by the trigger.
    revision bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (name, instance_id)
);
-- Names whose registry events the instance receives on its events queue
-- (RabbitMQ), and that queue's name; added after the first release.
ALTER TABLE registry.instances
    ADD COLUMN IF NOT EXISTS follows jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN IF NOT EXISTS events_queue text NOT NULL DEFAULT '';

CREATE TABLE IF NOT EXISTS registry.events (
    revision bigint PRIMARY KEY,
    type text NOT NULL
        CHECK (type IN ('registered', 'updated', 'status_changed', 'deregistered')),
    name text NOT NULL,
    instance_id text NOT NULL,
    generation bigint NOT NULL,
    status text NOT NULL,
    -- The entry after the change (as it was, for a deregistration), in the
    -- shape of registry.instances without the token hash.
    entry jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_name_revision ON registry.events (name, revision);

CREATE OR REPLACE FUNCTION registry.record_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    event_type text;
    source registry.instances;
    next_revision bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        event_type := 'registered';
        source := NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Bookkeeping that changes no field a reader sees makes no event.
        IF (OLD.generation, OLD.status, OLD.address, OLD.version, OLD.description,
            OLD.apis, OLD.brokers, OLD.metadata, OLD.health_check)
           IS NOT DISTINCT FROM
           (NEW.generation, NEW.status, NEW.address, NEW.version, NEW.description,
            NEW.apis, NEW.brokers, NEW.metadata, NEW.health_check)
        THEN
            RETURN NEW;
        END IF;
        IF (OLD.generation, OLD.address, OLD.version, OLD.description, OLD.apis,
            OLD.brokers, OLD.metadata, OLD.health_check)
           IS NOT DISTINCT FROM
           (NEW.generation, NEW.address, NEW.version, NEW.description, NEW.apis,
            NEW.brokers, NEW.metadata, NEW.health_check)
        THEN
            event_type := 'status_changed';
        ELSE
            event_type := 'updated';
        END IF;
        source := NEW;
    ELSE
        event_type := 'deregistered';
        source := OLD;
    END IF;

    -- Taking the counter's row lock here is what orders revisions by commit.
    UPDATE registry.revision SET revision = revision + 1
    RETURNING revision INTO next_revision;

    source.revision := next_revision;
    IF TG_OP <> 'DELETE' THEN
        NEW.revision := next_revision;
        NEW.updated_at := now();
        source.updated_at := NEW.updated_at;
    END IF;

    INSERT INTO registry.events (revision, type, name, instance_id, generation,
                                 status, entry)
    VALUES (next_revision, event_type, source.name, source.instance_id,
            source.generation, source.status,
            to_jsonb(source) - 'token_hash');

    PERFORM pg_notify('registry_events', json_build_object(
        'revision', next_revision,
        'type', event_type,
        'name', source.name,
        'instance_id', source.instance_id,
        'status', source.status)::text);

    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;

-- BEFORE, so that the row itself carries the revision of its last event and
-- an upsert's RETURNING hands it back in the same round trip.
DROP TRIGGER IF EXISTS record_event ON registry.instances;
CREATE TRIGGER record_event
    BEFORE INSERT OR UPDATE OR DELETE ON registry.instances
    FOR EACH ROW EXECUTE FUNCTION registry.record_event();

-- Stores a registration as a new generation of (name, instance_id). An upsert
-- (INSERT ... ON CONFLICT) would fire the BEFORE INSERT trigger even when it
-- ends up updating, and so record an event for a row never inserted; updating
-- first and inserting only when nothing was there records exactly one.
CREATE OR REPLACE FUNCTION registry.put_instance(
    p_name text, p_instance_id text, p_status text, p_address text,
    p_version text, p_description text, p_apis jsonb, p_brokers jsonb,
    p_metadata jsonb, p_health_check jsonb, p_token_hash bytea,
    p_follows jsonb, p_events_queue text
) RETURNS registry.instances
LANGUAGE plpgsql AS $$
DECLARE
    stored registry.instances;
BEGIN
    -- The instance's turn (see registry.register_many): taken again, it is a
    -- no-op; called alone, by a SQL caller, it keeps the writers' lock order.
    PERFORM pg_advisory_xact_lock(1768846196,
        hashtext(p_name || '/' || p_instance_id));
    LOOP
        UPDATE registry.instances
        SET generation = generation + 1, status = p_status, address = p_address,
            version = p_version, description = p_description, apis = p_apis,
            brokers = p_brokers, metadata = p_metadata,
            health_check = p_health_check, token_hash = p_token_hash,
            follows = p_follows, events_queue = p_events_queue
        WHERE name = p_name AND instance_id = p_instance_id
        RETURNING * INTO stored;
        IF FOUND THEN
            RETURN stored;
        END IF;
        BEGIN
            INSERT INTO registry.instances (name, instance_id, status, address,
                version, description, apis, brokers, metadata, health_check,
                token_hash, follows, events_queue)
            VALUES (p_name, p_instance_id, p_status, p_address, p_version,
                p_description, p_apis, p_brokers, p_metadata, p_health_check,
                p_token_hash, p_follows, p_events_queue)
            RETURNING * INTO stored;
            RETURN stored;
        EXCEPTION WHEN unique_violation THEN
            -- A concurrent first registration of the same instance won the
            -- insert: go round and update it instead.
        END;
    END LOOP;
END;
$$;

-- The signature from before follows, for SQL callers: follows nothing.
CREATE OR REPLACE FUNCTION registry.put_instance(
    p_name text, p_instance_id text, p_status text, p_address text,
    p_version text, p_description text, p_apis jsonb, p_brokers jsonb,
    p_metadata jsonb, p_health_check jsonb, p_token_hash bytea
) RETURNS registry.instances
LANGUAGE sql AS $$
    SELECT * FROM registry.put_instance(p_name, p_instance_id, p_status,
        p_address, p_version, p_description, p_apis, p_brokers, p_metadata,
        p_health_check, p_token_hash, '[]', '');
$$;

-- For SQL consumers: what Resolve answers, one row per instance.
CREATE OR REPLACE VIEW registry.active_instances AS
    SELECT name, instance_id, generation, address, version, description, apis,
           brokers, metadata, registered_at, updated_at, revision
    FROM registry.instances
    WHERE status = 'active';

-- One row per API of every instance.
CREATE OR REPLACE VIEW registry.instance_apis AS
    SELECT i.name, i.instance_id, i.status, i.address,
           api.name AS api, api.port
    FROM registry.instances AS i,
         jsonb_to_recordset(i.apis) AS api(name text, port integer);

-- One row per broker binding of every instance.
CREATE OR REPLACE VIEW registry.instance_brokers AS
    SELECT i.name, i.instance_id, i.status,
           b.exchange, b.routing_key, b.type, b.queue
    FROM registry.instances AS i,
         jsonb_to_recordset(i.brokers)
             AS b(exchange text, routing_key text, type text, queue text);

-- Health probing. One row per instance with a health check, kept in step with
-- registry.instances by the trigger below: a new generation (or a changed
-- check) starts the row afresh, due at once; removing the check or the
-- instance removes it. Replicas share the probing through these rows: each
-- claims due rows with FOR UPDATE SKIP LOCKED and a lease, probes, and
-- records the outcome and any status change in one transaction.
CREATE TABLE IF NOT EXISTS registry.probes (
    name text NOT NULL,
    instance_id text NOT NULL,
    -- The generation the counters belong to; a probe of another is dropped.
    generation bigint NOT NULL,
    next_due timestamptz NOT NULL DEFAULT now(),
    -- The claim (replica and batch) holding the row, and until when.
    lease_owner text,
    lease_expires timestamptz,
    -- Consecutive outcomes; one of the two is 0.
    successes integer NOT NULL DEFAULT 0,
    failures integer NOT NULL DEFAULT 0,
    -- Since when the instance is down (failure threshold reached, no
    -- recovery since): deregister-after counts from here.
    down_since timestamptz,
    -- TTL checks: the instance must heartbeat before this.
    ttl_deadline timestamptz,
    -- The last probe's outcome.
    last_probe_at timestamptz,
    last_healthy boolean,
    last_code integer,
    last_error text,
    last_latency_ms double precision,
    PRIMARY KEY (name, instance_id),
    FOREIGN KEY (name, instance_id) REFERENCES registry.instances (name, instance_id)
        ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS probes_next_due ON registry.probes (next_due);
-- The rows in flight: few, however many instances there are.
CREATE INDEX IF NOT EXISTS probes_leased ON registry.probes (lease_expires)
    WHERE lease_expires IS NOT NULL;

CREATE OR REPLACE FUNCTION registry.sync_probe() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ttl interval;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.generation = NEW.generation
       AND OLD.health_check IS NOT DISTINCT FROM NEW.health_check THEN
        RETURN NULL;
    END IF;
    IF NEW.health_check IS NULL THEN
        DELETE FROM registry.probes
        WHERE name = NEW.name AND instance_id = NEW.instance_id;
        RETURN NULL;
    END IF;
    -- A TTL check's first heartbeat is due one TTL after registration.
    IF NEW.health_check->>'kind' = 'ttl' THEN
        ttl := make_interval(secs => (NEW.health_check->>'ttl_seconds')::float8);
    END IF;
    INSERT INTO registry.probes (name, instance_id, generation, next_due,
                                 ttl_deadline)
    VALUES (NEW.name, NEW.instance_id, NEW.generation, now() + coalesce(ttl, '0'),
            now() + ttl)
    ON CONFLICT (name, instance_id) DO UPDATE
    SET generation = EXCLUDED.generation, next_due = EXCLUDED.next_due,
        ttl_deadline = EXCLUDED.ttl_deadline, lease_owner = NULL,
        lease_expires = NULL, successes = 0, failures = 0, down_since = NULL,
        last_probe_at = NULL, last_healthy = NULL, last_code = NULL,
        last_error = NULL, last_latency_ms = NULL;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS sync_probe ON registry.instances;
CREATE TRIGGER sync_probe
    AFTER INSERT OR UPDATE ON registry.instances
    FOR EACH ROW EXECUTE FUNCTION registry.sync_probe();

-- Instances registered before probing existed.
INSERT INTO registry.probes (name, instance_id, generation)
    SELECT name, instance_id, generation FROM registry.instances
    WHERE health_check IS NOT NULL
ON CONFLICT DO NOTHING;

-- Every status change of an instance with its cause: the probe that made it
-- (probe_* columns), or none for a change the service asked for (Drain).
-- Kept for the history retention window, then compacted by the janitor.
CREATE TABLE IF NOT EXISTS registry.transitions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    instance_id text NOT NULL,
    generation bigint NOT NULL,
    from_status text NOT NULL,
    to_status text NOT NULL,
    -- The revision of the status_changed event.
    revision bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    probe_healthy boolean,
    probe_code integer,
    probe_error text,
    probe_latency_ms double precision
);
CREATE INDEX IF NOT EXISTS transitions_instance
    ON registry.transitions (name, instance_id, id);
CREATE INDEX IF NOT EXISTS transitions_created_at
    ON registry.transitions (created_at);

-- Ports held on each address (local and remote port modes). The primary key
-- is what makes a port go to one instance only, whatever the replicas do at
-- the same moment; registrations on one address also take turns (an advisory
-- lock, see registry.register below), so that they never wait on each other's
-- uncommitted rows. A new generation replaces its instance's rows in the
-- transaction that stores it; deregistration drops them (ON DELETE CASCADE).
CREATE TABLE IF NOT EXISTS registry.ports (
    -- As registered; IP addresses in their canonical form.
    address text NOT NULL,
    port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    name text NOT NULL,
    instance_id text NOT NULL,
    -- The API of that instance which holds the port.
    api text NOT NULL,
    PRIMARY KEY (address, port),
    -- Checked at commit: a first registration writes its ports before the
    -- instance's row (see registry.register).
    FOREIGN KEY (name, instance_id) REFERENCES registry.instances (name, instance_id)
        ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);
CREATE INDEX IF NOT EXISTS ports_instance ON registry.ports (name, instance_id);

-- Register in one statement: one round trip and one implicit transaction, so
-- the revision counter's lock is never held across a round trip to the
-- replica. Under its address's turn (an advisory lock: registrations on one
-- address never wait on each other's uncommitted port rows, and two such
-- waits could deadlock) it refuses a port that another instance holds on the
-- address, with SQLSTATE RG001 and the holder as JSON in the DETAIL; else it
-- replaces the instance's ports with p_apis' and stores the entry as its next
-- generation. The instance's row is locked before its ports, the order in
-- which deregistration takes them (the delete cascades); the ports are written
-- before the entry, whose trigger takes the counter's lock, so that as little
-- as possible comes after it (the ports' foreign key is checked at commit).
CREATE OR REPLACE FUNCTION registry.register(
    p_name text, p_instance_id text, p_status text, p_address text,
    p_address_key text, p_version text, p_description text, p_apis jsonb,
    p_brokers jsonb, p_metadata jsonb, p_health_check jsonb, p_token_hash bytea,
    p_follows jsonb, p_events_queue text
) RETURNS registry.instances
LANGUAGE plpgsql AS $$
DECLARE
    holder registry.ports;
    stored registry.instances;
BEGIN
    -- The instance's turn, then its address's: advisory locks whose key
    -- spaces are "inst" and "port" in ASCII (see registry.register_many for
    -- the order every writer keeps). The instance's turn stops another
    -- registration from creating its row while a batch holds it.
    PERFORM pg_advisory_xact_lock(1768846196,
        hashtext(p_name || '/' || p_instance_id));
    PERFORM pg_advisory_xact_lock(1886351988, hashtext(p_address_key));
    PERFORM 1 FROM registry.instances
    WHERE name = p_name AND instance_id = p_instance_id
    FOR UPDATE;

    SELECT held.* INTO holder
    FROM registry.ports AS held
    JOIN jsonb_to_recordset(p_apis) AS api(name text, port integer)
        ON held.port = api.port
    WHERE held.address = p_address_key
      AND (held.name, held.instance_id) <> (p_name, p_instance_id)
    ORDER BY held.port
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'port % on % is held by another instance',
            holder.port, p_address_key
        USING ERRCODE = 'RG001',
              DETAIL = json_build_object('port', holder.port, 'name', holder.name,
                  'instance_id', holder.instance_id, 'api', holder.api)::text;
    END IF;

    DELETE FROM registry.ports WHERE name = p_name AND instance_id = p_instance_id;
    INSERT INTO registry.ports (address, port, name, instance_id, api)
    SELECT p_address_key, api.port, p_name, p_instance_id, api.name
    FROM jsonb_to_recordset(p_apis) AS api(name text, port integer);

    SELECT * INTO stored FROM registry.put_instance(p_name, p_instance_id,
        p_status, p_address, p_version, p_description, p_apis, p_brokers,
        p_metadata, p_health_check, p_token_hash, p_follows, p_events_queue);
    RETURN stored;
END;
$$;

-- Many registrations in one transaction, so that they share one commit (one
-- WAL flush) and one hold of the revision counter: group commit, as a
-- replica batches the Register calls that arrive together. p_items is a JSON
-- array of objects holding registry.register's arguments by name, without
-- their p_ prefix (token_hash in hex). One row comes back per item, in
-- order: the stored entry (without its token hash), or the item's error.
--
-- Every lock the items will need is taken first, in one order that every
-- writer keeps: the instances' turns (advisory locks, by key), the
-- addresses' turns (likewise), the instance rows (by name and instance id),
-- then the revision counter. A single-row write (heartbeat, drain, probe
-- result, deregistration) takes one instance row, then the counter; and
-- while a batch holds an instance's turn, no other registration can create
-- that instance's row for someone to lock. So two batches, or a batch and
-- any other write, never wait on each other in a cycle. Each item then runs
-- in a subtransaction of its own: one that is refused (a port held) is
-- undone alone, and the others stand.
CREATE OR REPLACE FUNCTION registry.register_many(p_items jsonb)
RETURNS TABLE (entry jsonb, error_state text, error_message text,
               error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    stored registry.instances;
    lock_space integer;
    lock_key integer;
    wanted_name text;
    wanted_id text;
BEGIN
    FOR lock_space, lock_key IN
        SELECT 1768846196, hashtext((i->>'name') || '/' || (i->>'instance_id'))
        FROM jsonb_array_elements(p_items) AS i
        UNION
        SELECT 1886351988, hashtext(i->>'address_key')
        FROM jsonb_array_elements(p_items) AS i
        ORDER BY 1, 2
    LOOP
        PERFORM pg_advisory_xact_lock(lock_space, lock_key);
    END LOOP;
    -- Row by row, each found by its key: as one join with the items, the
    -- planner (which guesses a hundred items) scans the whole table, a cost
    -- that grows with the registry.
    FOR wanted_name, wanted_id IN
        SELECT DISTINCT i->>'name', i->>'instance_id'
        FROM jsonb_array_elements(p_items) AS i
        ORDER BY 1, 2
    LOOP
        PERFORM 1 FROM registry.instances
        WHERE name = wanted_name AND instance_id = wanted_id
        FOR UPDATE;
    END LOOP;
    PERFORM 1 FROM registry.revision FOR UPDATE;

    FOR item IN SELECT value FROM jsonb_array_elements(p_items) LOOP
        entry := NULL;
        error_state := NULL;
        error_message := NULL;
        error_detail := NULL;
        BEGIN
            SELECT * INTO stored FROM registry.register(
                item->>'name', item->>'instance_id', item->>'status',
                item->>'address', item->>'address_key', item->>'version',
                item->>'description', item->'apis', item->'brokers',
                item->'metadata', NULLIF(item->'health_check', 'null'::jsonb),
                decode(item->>'token_hash', 'hex'), item->'follows',
                item->>'events_queue');
            entry := to_jsonb(stored) - 'token_hash';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE,
                error_message = MESSAGE_TEXT, error_detail = PG_EXCEPTION_DETAIL;
        END;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- The RabbitMQ outbox: every event up to `published` has been published to
-- the events exchange. One row, so that one replica at a time publishes, in
-- revision order: a replica claims the row with FOR UPDATE SKIP LOCKED,
-- publishes the next events with publisher confirms, moves `published` on and
-- commits; the others skip it meanwhile. A registry that had events before
-- the outbox existed starts publishing from its newest revision.
CREATE TABLE IF NOT EXISTS registry.outbox (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    published bigint NOT NULL,
    published_at timestamptz
);
INSERT INTO registry.outbox (published)
    SELECT revision FROM registry.revision
ON CONFLICT DO NOTHING;

-- Events not yet published to RabbitMQ (the outbox's backlog).
CREATE OR REPLACE FUNCTION registry.outbox_backlog() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM registry.events
    WHERE revision > (SELECT published FROM registry.outbox);
$$;
