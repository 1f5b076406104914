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
    p_metadata jsonb, p_health_check jsonb, p_token_hash bytea
) RETURNS registry.instances
LANGUAGE plpgsql AS $$
DECLARE
    stored registry.instances;
BEGIN
    LOOP
        UPDATE registry.instances
        SET generation = generation + 1, status = p_status, address = p_address,
            version = p_version, description = p_description, apis = p_apis,
            brokers = p_brokers, metadata = p_metadata,
            health_check = p_health_check, token_hash = p_token_hash
        WHERE name = p_name AND instance_id = p_instance_id
        RETURNING * INTO stored;
        IF FOUND THEN
            RETURN stored;
        END IF;
        BEGIN
            INSERT INTO registry.instances (name, instance_id, status, address,
                version, description, apis, brokers, metadata, health_check,
                token_hash)
            VALUES (p_name, p_instance_id, p_status, p_address, p_version,
                p_description, p_apis, p_brokers, p_metadata, p_health_check,
                p_token_hash)
            RETURNING * INTO stored;
            RETURN stored;
        EXCEPTION WHEN unique_violation THEN
            -- A concurrent first registration of the same instance won the
            -- insert: go round and update it instead.
        END;
    END LOOP;
END;
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
