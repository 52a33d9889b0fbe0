/**
 * Every error qlayer raises on purpose is a QlayerError with a stable `code`, so that the CLI
 * can print a one-line message (no stack) and scripts can match on `--json` output.
 * Subsystems subclass it (Qcow2Error, Ext4Error, VirtError, ...) and keep their own codes.
 */
export class QlayerError extends Error {
  /** Stable machine-readable identifier, e.g. `qcow2.unknown-incompatible-feature`. */
  readonly code: string;
  /** Process exit code the CLI uses when this error ends a command. */
  readonly exitCode: number;

  constructor(code: string, message: string, options?: { cause?: unknown; exitCode?: number }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.exitCode = options?.exitCode ?? 1;
  }
}

export function isQlayerError(error: unknown): error is QlayerError {
  return error instanceof QlayerError;
}
