/**
 * The guest-side half of an assign or update, and undoing it. Allocation, shutdown and locate
 * run while the store does not yet know the app as assigned; if any of them fails, the guest
 * must not keep placeholders nobody will ever fill. The operation is recorded before the guest
 * is touched, with what the guest got as soon as the allocation reports it; an undo deletes
 * those placeholders that are still untouched and the folders left empty, and puts the desktop
 * back as it was (running or stopped). An undo that cannot run (the guest does not boot) stays
 * recorded and runs again with the next command on the desktop, or `desktop assign --abort`.
 */
import { removePlaceholders, type RollbackResult } from './allocate.js';
import type { AppManifest } from './app.js';
import { LayerError } from './errors.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { DesktopRecord, GuestOperation } from './state.js';

export function newOperation(kind: GuestOperation['kind'], apps: string[], replacing: string[], wasRunning: boolean): GuestOperation {
  return { kind, apps, replacing, phase: 'allocating', created: null, wasRunning, startedAt: new Date().toISOString(), failure: null };
}

export interface UndoContext {
  name: string;
  record: DesktopRecord;
  handle: DesktopHandle;
  runtime: DesktopRuntime;
  resolve: (ref: string) => Promise<AppManifest>;
  persist: () => Promise<void>;
  log: (message: string) => void;
}

/** What an undo did, for the user: "removed 40 placeholders and 3 folders". */
export function describeUndo(result: RollbackResult | null): string {
  if (!result) return 'the guest had got nothing yet';
  const parts = [`removed ${result.removed} placeholder${result.removed === 1 ? '' : 's'} and ${result.dirsRemoved} folder${result.dirsRemoved === 1 ? '' : 's'}`];
  if (result.missing) parts.push(`${result.missing} already gone`);
  if (result.left.length) parts.push(`left ${result.left.length} that no longer are untouched placeholders (the user's now): ${result.left.slice(0, 5).join(', ')}${result.left.length > 5 ? ', ...' : ''}`);
  return parts.join('; ');
}

/**
 * Undo the recorded operation of `ctx.record`: boot if needed, delete what the guest got (all
 * of the apps' paths when the allocation could not say), restore running/stopped, clear the
 * record. Throws if the guest cannot be reached; the record then stays, marked rolling back.
 */
export async function undoOperation(ctx: UndoContext): Promise<RollbackResult | null> {
  const op = ctx.record.operation;
  if (!op) return null;
  if (op.phase !== 'rolling-back') {
    op.phase = 'rolling-back';
    await ctx.persist();
  }
  const paths = op.created ?? (await everyPath(op, ctx.resolve));
  let result: RollbackResult | null = null;
  if (paths.files.length || paths.dirs.length) {
    if (!(await ctx.runtime.isRunning(ctx.handle))) {
      ctx.log(`starting ${ctx.name} to undo the ${op.kind} of ${op.apps.join(', ')}`);
      await ctx.runtime.start(ctx.handle);
    }
    ctx.log(`undoing the ${op.kind} of ${op.apps.join(', ')}: removing ${paths.files.length} placeholders in the guest`);
    result = await removePlaceholders(ctx.runtime.shell(ctx.handle), paths);
    ctx.log(describeUndo(result));
  }
  if (!op.wasRunning && (await ctx.runtime.isRunning(ctx.handle))) {
    ctx.log(`shutting ${ctx.name} down, as it was before the ${op.kind}`);
    await ctx.runtime.stop(ctx.handle);
  }
  ctx.record.operation = null;
  await ctx.persist();
  return result;
}

/** Every file and folder of the operation's apps: what to check when the guest's report was lost. */
async function everyPath(op: GuestOperation, resolve: (ref: string) => Promise<AppManifest>): Promise<{ files: Array<{ path: string; size: number }>; dirs: string[] }> {
  const manifests = await Promise.all(op.apps.map(resolve));
  return {
    files: manifests.flatMap((m) => m.files.map((f) => ({ path: f.path, size: f.size }))),
    dirs: manifests.flatMap((m) => m.directories.map((d) => d.path)),
  };
}

/**
 * After a failed step: record why, undo, and return the error to throw. It keeps the cause's
 * code (scripts match on it) and says what was undone, or how the undo will be finished.
 */
export async function failAndUndo(ctx: UndoContext, cause: unknown): Promise<Error> {
  const code = typeof (cause as { code?: unknown })?.code === 'string' ? (cause as { code: string }).code : 'assign.failed';
  const message = cause instanceof Error ? cause.message : String(cause);
  const op = ctx.record.operation;
  if (!op) return cause instanceof Error ? cause : new LayerError(code, message);
  op.failure = { code, message };
  op.phase = 'rolling-back';
  await ctx.persist();
  const replaced = op.replacing.length
    ? `\n${op.replacing.join(', ')} had already been deleted in the guest; the store still lists ${op.replacing.length === 1 ? 'it' : 'them'}: drop with qlayer desktop unassign ${ctx.name} ${op.replacing.map((a) => a.split('@')[0]).join(' ')}`
    : '';
  try {
    const result = await undoOperation(ctx);
    return Object.assign(new LayerError(code, `${message}\nundone: ${describeUndo(result)}${replaced}`), { undone: result });
  } catch (undoError) {
    const why = undoError instanceof Error ? undoError.message : String(undoError);
    return new LayerError(
      code,
      `${message}\nthe undo could not finish (${why}); it runs with the next command on ${ctx.name}, or now: qlayer desktop assign --abort ${ctx.name}${replaced}`,
    );
  }
}

/** The operation as `desktop show` presents it: where it stands and the commands that end it. */
export function operationView(name: string, op: GuestOperation): { kind: string; apps: string[]; phase: string; failure: GuestOperation['failure']; finish: string; undo: string } {
  return {
    kind: op.kind,
    apps: op.apps,
    phase: op.phase,
    failure: op.failure,
    // Finishing means doing it again: the next assign undoes the leftovers first.
    finish: op.kind === 'update' ? `qlayer desktop update ${name} ${op.apps[0] ?? ''}` : `qlayer desktop assign ${name} ${op.apps.join(' ')}`,
    undo: `qlayer desktop assign --abort ${name}`,
  };
}
