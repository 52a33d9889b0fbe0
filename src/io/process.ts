/**
 * Who is a process, beyond its pid: the kernel reuses pids, so a lock or a leftover that only
 * records a pid can be mistaken for a live one after the writer died. A pid plus its start time
 * (field 22 of /proc/PID/stat, clock ticks since boot) names one process for as long as the host
 * runs. Linux only, like the rest of qlayer; without procfs the start time is unknown (null).
 */
import { readFileSync } from 'node:fs';

/** Is a process with this pid alive on this host? (EPERM means it exists but is not ours.) */
export function processAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The process's start time (field 22 of /proc/PID/stat), or null when it does not exist. */
export function processStartTime(pid: number): string | null {
  if (!Number.isInteger(pid) || pid <= 0) return null;
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  } catch {
    return null;
  }
  // Field 2 (comm) is in parentheses and may hold spaces and ')': fields resume after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state), so field 22 is fields[19].
  const start = fields[19];
  return start !== undefined && /^\d+$/.test(start) ? start : null;
}

/** The command line of a process, arguments joined by spaces (null when unreadable). */
export function processCommandLine(pid: number): string | null {
  try {
    const raw = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    const text = raw.split('\0').filter((part) => part !== '').join(' ');
    return text === '' ? null : text;
  } catch {
    return null;
  }
}

/**
 * Is the process that recorded (pid, startTime) still running? With no start time recorded (an
 * older qlayer, or no procfs) only the pid can be checked.
 */
export function sameProcessAlive(pid: number, startTime: string | null): boolean {
  if (!processAlive(pid)) return false;
  if (startTime === null) return true;
  const now = processStartTime(pid);
  // Alive but unreadable (hidepid): cannot tell, so assume it is the same one.
  return now === null || now === startTime;
}
