import { QlayerError } from '../errors.js';

/**
 * Stable codes for everything the qcow2 engine refuses. Callers (CLI, layers) match on `code`;
 * messages name the offending field or feature so a user knows what was wrong with the file.
 */
export type Qcow2ErrorCode =
  | 'qcow2.bad-magic'
  | 'qcow2.unsupported-version'
  | 'qcow2.unknown-incompatible-feature'
  | 'qcow2.unsupported-feature'
  | 'qcow2.corrupt'
  | 'qcow2.corrupt-flag-set'
  | 'qcow2.dirty'
  | 'qcow2.encrypted'
  | 'qcow2.bad-header-field'
  | 'qcow2.bad-header-extension'
  | 'qcow2.offset-past-eof'
  | 'qcow2.too-large'
  | 'qcow2.read-only'
  | 'qcow2.bitmaps-present'
  | 'qcow2.out-of-range'
  | 'qcow2.decompress-failed'
  | 'qcow2.bad-argument'
  | 'qcow2.closed'
  | 'qcow2.no-such-snapshot'
  | 'qcow2.not-found'
  | ChainErrorCode;

export class Qcow2Error extends QlayerError {
  declare readonly code: Qcow2ErrorCode;
  constructor(code: Qcow2ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Codes for backing-chain problems (loops, refused names, confinement). */
export type ChainErrorCode =
  | 'chain.loop'
  | 'chain.too-deep'
  | 'chain.refused-protocol'
  | 'chain.outside-allowed'
  | 'chain.not-regular-file'
  | 'chain.missing-backing-format'
  | 'chain.unsupported-format'
  | 'chain.backing-not-found'
  | 'chain.output-is-input';

/** A chain problem is a Qcow2Error too, so callers can catch one class for "this image set is unusable". */
export class ChainError extends Qcow2Error {
  declare readonly code: ChainErrorCode;
  constructor(code: ChainErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}
