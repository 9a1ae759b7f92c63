'use strict';
// The action's `main` step: exchange the job's ID token for credentials.
require('./lib.js')
  .run()
  .then((ok) => {
    if (!ok) process.exitCode = 1;
  });
