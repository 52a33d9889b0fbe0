import { useVmDiagnostics } from 'qlayer/testing/vitest';

useVmDiagnostics();
