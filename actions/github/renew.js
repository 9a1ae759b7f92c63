'use strict';
// Renews the lease of a lease file and prints a fresh credential: the AWS profile that `main`
// writes runs it as its `credential_process`. Like the `ephemera` CLI, and reading the same file:
//   node renew.js credential-process --lease-file F     the AWS credential_process document
//   node renew.js token --lease-file F --credential N   credential N's token (or its JSON)
// Only the credential goes to stdout; errors go to stderr, never with the renew token.
const lib = require('./lib.js');

const ctx = { ...lib.defaultContext(), write: (s) => process.stderr.write(s) };
lib.renewCommand(ctx, process.argv.slice(2)).then(({ exit, out }) => {
  if (out) process.stdout.write(out);
  process.exitCode = exit;
});
