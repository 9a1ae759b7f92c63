'use strict';
// The action's `post` step (post-if: always()): revoke the lease, delete the lease files. A
// failure is only a warning.
require('./lib.js').post();
