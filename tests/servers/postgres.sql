-- The schema the source tests query. The role `app` owns the database `appdb`.
CREATE ROLE app LOGIN PASSWORD 'pg-app-pw-7c1d93e0';
CREATE DATABASE appdb OWNER app;
\c appdb
SET ROLE app;
CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, total numeric(12, 2) NOT NULL, created_at timestamptz NOT NULL);
INSERT INTO orders VALUES
  (1, 'ada', 12.50, '2026-01-02T03:04:05Z'),
  (2, 'ada', 7.25, '2026-01-03T00:00:00Z'),
  (3, 'bob', 100.00, '2026-02-01T12:00:00Z'),
  (4, 'o''brien', 1.00, '2026-02-02T12:00:00Z');
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE kinds (
  id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, t text,
  vc varchar(10), c char(3), ts timestamp, tstz timestamptz, d date, tm time, j json, jb jsonb,
  u uuid, by bytea, ai int4[], at text[], m mood, inf float8, big_n numeric
);
INSERT INTO kinds VALUES
  (1, true, -2, 40000, 9007199254740993, 1.5, 2.25, 12345678901234567890.0123456789, 'héllo', 'short', 'ab',
   '2026-03-04 05:06:07.123456', '2026-03-04 05:06:07+02', '2026-03-04', '13:14:15', '{"a": [1, 2]}', '{"b": null}',
   '6f1c1d8e-2b7a-4c3e-9d4f-0a1b2c3d4e5f', '\x00ff10', '{1, NULL, 3}', '{"x", "y"}', 'sad', 'Infinity', -0.5),
  (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
CREATE TABLE big AS SELECT g AS id, md5(g::text) AS label FROM generate_series(1, 100000) g;
ALTER TABLE big ADD PRIMARY KEY (id);
CREATE TABLE victims (id int PRIMARY KEY);
INSERT INTO victims VALUES (1), (2), (3);
CREATE FUNCTION add_victim() RETURNS int LANGUAGE sql AS 'INSERT INTO victims VALUES (99) RETURNING 1';
ANALYZE;
