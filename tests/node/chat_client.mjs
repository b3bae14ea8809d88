// A Node.js client of chat.v1.ChatService, built from proto/chat/v1/chat.proto at run time, so the contract is
// checked from a second language with no generated code in between.
//
//   node chat_client.mjs HOST:PORT [--proto PATH] [--timeout-ms N] [--ca PATH]
//                                                                    run the scenario (over TLS trusting the CA in
//                                                                    PATH when --ca is given), print one JSON document
//   node chat_client.mjs --check [--proto PATH]                       load the proto and build the stub, then exit
//
// Exit 0 with the JSON document on stdout; exit 1 with the reason (and what was received so far) on stderr.

import fs from 'node:fs';
import path from 'node:path';
import process from 'node:process';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_PROTO = path.resolve(HERE, '..', '..', 'proto', 'chat', 'v1', 'chat.proto');
const ROOM = 'node-room';

/** Parses argv into {address, protoPath, check, timeoutMs, caPath}; exits 2 on a usage error. */
function parseArgs(argv) {
  const args = { address: null, protoPath: DEFAULT_PROTO, check: false, timeoutMs: 20_000, caPath: null };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--check') args.check = true;
    else if (arg === '--proto') args.protoPath = path.resolve(argv[(i += 1)] ?? '');
    else if (arg === '--timeout-ms') args.timeoutMs = Number(argv[(i += 1)]);
    else if (arg === '--ca') args.caPath = path.resolve(argv[(i += 1)] ?? '');
    else if (!arg.startsWith('--') && args.address === null) args.address = arg;
    else usage(`unexpected argument ${JSON.stringify(arg)}`);
  }
  if (!args.check && args.address === null) usage('the server address (HOST:PORT) is required');
  if (!(args.timeoutMs > 0)) usage('--timeout-ms needs a positive number');
  return args;
}

function usage(problem) {
  process.stderr.write(`chat_client: ${problem}\nusage: node chat_client.mjs HOST:PORT [--proto PATH] ` +
    '[--timeout-ms N] [--ca PATH] | --check [--proto PATH]\n');
  process.exit(2);
}

/** Loads the ChatService stub constructor from the .proto file, resolving imports from its proto root. */
function loadService(protoPath) {
  // The proto root is three levels up from chat/v1/chat.proto, so the file is loaded by its import path, as
  // protoc would; google/protobuf/timestamp.proto comes from the well-known types protobufjs ships.
  const protoRoot = path.resolve(path.dirname(protoPath), '..', '..');
  const definition = protoLoader.loadSync(path.relative(protoRoot, protoPath), {
    includeDirs: [protoRoot],
    keepCase: true,
    enums: String,
    // uint64 as strings, as the proto3 JSON mapping does, so nothing is rounded.
    longs: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  const ChatService = pkg.chat?.v1?.ChatService;
  if (typeof ChatService !== 'function') throw new Error(`${protoPath} defines no chat.v1.ChatService`);
  return ChatService;
}

/** One Chat stream: records every event in order and lets the scenario wait for a particular one. */
class Stream {
  constructor(label, call) {
    this.label = label;
    this.call = call;
    this.events = [];
    this.responses = 0;
    this.status = null;
    this.failure = null;
    this.waiters = [];
    call.on('data', (response) => {
      this.responses += 1;
      for (const event of response.events) this.events.push(recordEvent(event));
      this.settle();
    });
    call.on('status', (status) => {
      this.status = { code: status.code, code_name: grpc.status[status.code], details: status.details };
      this.settle();
    });
    call.on('error', (error) => {
      this.failure = new Error(`${label}'s Chat stream failed: ${describeGrpcError(error)}`);
      this.settle();
    });
  }

  send(request) {
    this.call.write(request);
  }

  /** Resolves with the first event (kind, fields) that satisfies `test`; rejects on an Error event or stream end. */
  waitFor(what, kind, test = () => true) {
    return this.enqueue(`${what}`, () => this.events.find((e) => e.kind === kind && test(e[kind])));
  }

  /** Resolves once the server has ended the stream with OK. */
  waitForEnd() {
    return this.enqueue('the stream to end with OK', () => (this.status?.code === grpc.status.OK ? this.status : undefined),
      { endIsFailure: false });
  }

  enqueue(what, probe, { endIsFailure = true } = {}) {
    return new Promise((resolve, reject) => {
      this.waiters.push({ what, probe, endIsFailure, resolve, reject });
      this.settle();
    });
  }

  settle() {
    // An Error event means a request was refused, so whatever the scenario waits for will never come.
    const refused = this.events.find((e) => e.kind === 'error');
    this.waiters = this.waiters.filter((waiter) => {
      const found = waiter.probe();
      if (found !== undefined) {
        waiter.resolve(found);
        return false;
      }
      let reason = this.failure?.message;
      if (!reason && refused) reason = `the server sent an Error event: ${JSON.stringify(refused.error)}`;
      if (!reason && waiter.endIsFailure && this.status) reason = `the stream ended (${this.status.code_name})`;
      if (!reason) return true;
      waiter.reject(new Error(`${this.label} waited for ${waiter.what}, but ${reason}`));
      return false;
    });
  }

  record() {
    return { events: this.events, responses: this.responses, status: this.status };
  }
}

/** Flattens an Event to {kind, <kind>: fields}, the shape of its proto3 JSON form. */
function recordEvent(event) {
  const kind = event.kind ?? null;
  return kind === null ? { kind } : { kind, [kind]: event[kind] };
}

function describeGrpcError(error) {
  if (error && typeof error.code === 'number') {
    return `${grpc.status[error.code] ?? error.code}: ${error.details ?? error.message}`;
  }
  return String(error?.message ?? error);
}

/** Calls a unary method as a promise with a deadline. */
function unary(client, method, request, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => {
      if (error) reject(new Error(`${method} failed: ${describeGrpcError(error)}`));
      else resolve(response);
    });
  });
}

/** Runs the two-member scenario and returns everything observed. */
async function scenario(client, deadline, streams) {
  const roomsBefore = (await unary(client, 'ListRooms', {}, deadline)).rooms;

  const alice = new Stream('alice', client.Chat({ deadline }));
  streams.push(alice);
  alice.send({ join: { room: ROOM, name: 'alice', create: true } });
  await alice.waitFor('Joined', 'joined');

  const bob = new Stream('bob', client.Chat({ deadline }));
  streams.push(bob);
  bob.send({ join: { room: ROOM, name: 'bob', create: false } });
  await Promise.all([
    bob.waitFor('Joined', 'joined'),
    alice.waitFor('MemberJoined(bob)', 'member_joined', (m) => m.name === 'bob'),
  ]);

  const aliceLine = 'hello from alice';
  const bobLine = 'hello from bob';
  alice.send({ say: { text: aliceLine } });
  // bob speaks only after seeing alice's line, so the room's order (seq 1 then 2) is fixed, not a race.
  await Promise.all([
    alice.waitFor("alice's own line", 'message', (m) => m.sender === 'alice' && m.text === aliceLine),
    bob.waitFor("alice's line", 'message', (m) => m.sender === 'alice' && m.text === aliceLine),
  ]);
  bob.send({ say: { text: bobLine } });
  await Promise.all([
    alice.waitFor("bob's line", 'message', (m) => m.sender === 'bob' && m.text === bobLine),
    bob.waitFor("bob's own line", 'message', (m) => m.sender === 'bob' && m.text === bobLine),
  ]);

  const secret = 'psst, bob';
  alice.send({ whisper: { recipient: 'bob', text: secret } });
  await Promise.all([
    alice.waitFor('the echo of her whisper', 'whisper', (w) => w.text === secret),
    bob.waitFor("alice's whisper", 'whisper', (w) => w.text === secret),
  ]);

  const roomsDuring = (await unary(client, 'ListRooms', {}, deadline)).rooms;

  bob.send({ leave: {} });
  bob.call.end();
  await Promise.all([
    bob.waitForEnd(),
    alice.waitFor('MemberLeft(bob)', 'member_left', (m) => m.name === 'bob'),
  ]);
  alice.send({ leave: {} });
  alice.call.end();
  await alice.waitForEnd();

  return {
    rooms_before: roomsBefore,
    rooms_during: roomsDuring,
    streams: { alice: alice.record(), bob: bob.record() },
  };
}

function fail(message, streams) {
  const received = Object.fromEntries(streams.map((s) => [s.label, s.record()]));
  process.stderr.write(`chat_client: ${message}\nreceived so far: ${JSON.stringify(received)}\n`);
  process.exit(1);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const ChatService = loadService(args.protoPath);
  if (args.check) {
    const client = new ChatService('127.0.0.1:1', grpc.credentials.createInsecure());
    const methods = ['ListRooms', 'CreateRoom', 'KillRoom', 'Chat'].filter((m) => typeof client[m] !== 'function');
    client.close();
    if (methods.length > 0) throw new Error(`the stub lacks ${methods.join(', ')}`);
    process.stdout.write(`ok: ${args.protoPath} loaded, chat.v1.ChatService stub built\n`);
    return;
  }

  const streams = [];
  // The one timer here is a guard, never a synchronisation: the scenario only waits on received events.
  const guard = setTimeout(
    () => fail(`the scenario did not finish within ${args.timeoutMs} ms`, streams),
    args.timeoutMs,
  );
  const credentials = args.caPath === null
    ? grpc.credentials.createInsecure()
    : grpc.credentials.createSsl(fs.readFileSync(args.caPath));
  const client = new ChatService(args.address, credentials);
  const deadline = new Date(Date.now() + args.timeoutMs);
  let result;
  try {
    result = await scenario(client, deadline, streams);
  } catch (error) {
    fail(error.message, streams);
  }
  clearTimeout(guard);
  client.close();
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
}

main().catch((error) => {
  process.stderr.write(`chat_client: ${error.message}\n`);
  process.exit(1);
});
