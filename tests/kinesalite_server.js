#!/usr/bin/env node
// Start an in-memory kinesalite (fake AWS Kinesis) for the Python test suite.
//
// Unlike kinesalite's own CLI, this listens on 127.0.0.1 only, on a port
// chosen by the OS (unless --port is given). Once listening it prints the
// port as a single line on stdout. It exits when it gets SIGTERM/SIGINT or
// when its stdin is closed (so it never outlives the Python process that
// spawned it with stdin=PIPE).
//
// Options (argv `--name=value`, else env var, else default):
//   --port            KINESALITE_PORT               0 (OS picks a free port)
//   --createStreamMs  KINESALITE_CREATE_STREAM_MS   0
//   --deleteStreamMs  KINESALITE_DELETE_STREAM_MS   0
//   --updateStreamMs  KINESALITE_UPDATE_STREAM_MS   0
//   --shardLimit      KINESALITE_SHARD_LIMIT        50
'use strict'

const kinesalite = require('kinesalite')

function option(name, envName, fallback) {
  const prefix = `--${name}=`
  const arg = process.argv.slice(2).find((a) => a.startsWith(prefix))
  const raw = arg !== undefined ? arg.slice(prefix.length) : process.env[envName]
  if (raw === undefined || raw === '') return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value < 0) {
    console.error(`kinesalite_server: invalid ${name}: ${JSON.stringify(raw)}`)
    process.exit(2)
  }
  return value
}

const port = option('port', 'KINESALITE_PORT', 0)
const server = kinesalite({
  // No `path` option: kinesalite then keeps everything in memory (memdown).
  createStreamMs: option('createStreamMs', 'KINESALITE_CREATE_STREAM_MS', 0),
  deleteStreamMs: option('deleteStreamMs', 'KINESALITE_DELETE_STREAM_MS', 0),
  updateStreamMs: option('updateStreamMs', 'KINESALITE_UPDATE_STREAM_MS', 0),
  shardLimit: option('shardLimit', 'KINESALITE_SHARD_LIMIT', 50),
})

let stopping = false
function stop() {
  if (stopping) return
  stopping = true
  // Open keep-alive connections would keep server.close() waiting forever.
  if (typeof server.closeAllConnections === 'function') server.closeAllConnections()
  server.close(() => process.exit(0))
  setTimeout(() => process.exit(0), 2000).unref()
}

server.on('error', (err) => {
  console.error(`kinesalite_server: ${err.stack || err}`)
  process.exit(1)
})

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`${server.address().port}\n`)
})

process.on('SIGTERM', stop)
process.on('SIGINT', stop)
process.stdin.on('end', stop)
process.stdin.on('error', stop)
process.stdin.resume()
