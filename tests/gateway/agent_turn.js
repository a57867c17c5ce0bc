// A Node.js client built at run time from the llmesh protos: creates a
// session, runs one agent turn and prints what it saw as JSON.
// usage: node agent_turn.js <target> <include dir>... ; env LLMESH_API_KEY optional;
// env LLMESH_TLS_CA, LLMESH_TLS_CERT, LLMESH_TLS_KEY (PEM files): mutual TLS instead of plaintext
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, ...includeDirs] = process.argv.slice(2);
const definition = protoLoader.loadSync('llmesh/orchestrator/v1/orchestrator.proto', {
  includeDirs, keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const pkg = grpc.loadPackageDefinition(definition).llmesh.orchestrator.v1;
const transport = process.env.LLMESH_TLS_CA
  ? grpc.credentials.createSsl(fs.readFileSync(process.env.LLMESH_TLS_CA),
                               fs.readFileSync(process.env.LLMESH_TLS_KEY), fs.readFileSync(process.env.LLMESH_TLS_CERT))
  : grpc.credentials.createInsecure();
const client = new pkg.AgentService(target, transport);
const metadata = new grpc.Metadata();
if (process.env.LLMESH_API_KEY) metadata.add('authorization', `Bearer ${process.env.LLMESH_API_KEY}`);

function fail(stage, err) {
  console.log(JSON.stringify({ stage, code: err.code, details: err.details }));
  process.exit(2);
}

client.CreateSession({ request_id: 'node-create-1', tenant_id: 'acme', title: 'from node' }, metadata, (err, reply) => {
  if (err) return fail('CreateSession', err);
  const sessionId = reply.session.session_id;
  const events = [];
  const call = client.Run({ request_id: 'node-run-1', tenant_id: 'acme', session_id: sessionId,
                            user_message: 'hello from node', options: { max_steps: 2, max_tokens: 16 } }, metadata);
  call.on('data', (msg) => events.push({
    seq: msg.event.seq, type: msg.event.type, body: msg.event.body, value: msg.event[msg.event.body] }));
  call.on('error', (e) => fail('Run', e));
  call.on('end', () => {
    console.log(JSON.stringify({ stage: 'done', session_id: sessionId, events }));
    client.close();
  });
});
