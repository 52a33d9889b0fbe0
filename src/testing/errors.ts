import { QlayerError } from '../errors.js';

/**
 * Errors of the test harness. Each code names one kind of problem, so a test can assert on it;
 * each message says what to change (users read these in failing test output).
 */
export type TestingErrorCode =
  | 'testing.bad-option'
  | 'testing.image-missing'
  | 'testing.app-missing'
  | 'testing.no-agent'
  | 'testing.guest-stopped'
  | 'testing.command-failed'
  | 'testing.command-timeout'
  | 'testing.wait-timeout'
  | 'testing.console-timeout'
  | 'testing.closed'
  | 'testing.snapshot-foreign';

export class TestingError extends QlayerError {
  declare readonly code: TestingErrorCode;
  constructor(code: TestingErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}
