//! A SQLite VFS that fails writes on command: the store's I/O-error test's disk.
//!
//! It wraps the process's default VFS and forwards every call to it, except that while the
//! fault of the directory a file lives under is on, that file's writes, syncs and truncations
//! fail with the codes SQLite's own VFS gives when the disk does (`SQLITE_IOERR_WRITE`,
//! `_FSYNC`, `_TRUNCATE`). Writes fail in runs of [`WRITE_RUN`], between runs that succeed,
//! and every sync fails, so a commit may fail at one of its writes or after all of them, at
//! the sync: both ways a failing disk ends a commit. When the fault ends, each file's next sync fails once more, as Linux reports an
//! earlier failed writeback to the next `fsync` of the file.
//!
//! Why not a real failing device: a device is faithful to the kernel too, and the kernel
//! this was written on loses data that `fsync` called written after a failed writeback
//! (see [`super::store`]'s device test). Here the fault is exactly what the test turns on,
//! and what the VFS lets through reaches the file.
//!
//! The VFS is registered once per process under [`NAME`]; a connection uses it by naming it
//! (`?vfs=` in a sqlx URL). Faults are kept per directory, so tests running in parallel in
//! this process each fail only their own files. Everything is forwarded through the file's
//! method table as SQLite's own shims do (`test_vfstrace.c`): the wrapper's file holds a
//! pointer to the default VFS's file, which sits right after it in the space SQLite gives.

use std::ffi::{CStr, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use libsqlite3_sys as ffi;

/// The VFS's name, as a connection names it.
pub const NAME: &str = "staged-failing";
const NAME_C: &CStr = c"staged-failing";

/// Writes fail and succeed in turn, this many calls at a time: longer than a small
/// commit's writes, so that some commits write everything and fail only at their sync.
pub const WRITE_RUN: u64 = 256;

/// One directory's fault: whether it is on, and what it has failed so far.
#[derive(Default)]
pub struct Fault {
    on: AtomicBool,
    /// Files whose next sync is to fail once, after the fault ended.
    report_after: AtomicBool,
    writes: AtomicU64,
    failed_writes: AtomicU64,
    failed_syncs: AtomicU64,
    failed_truncates: AtomicU64,
    reported_after: AtomicU64,
}

/// What a fault did: calls it failed, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    pub writes: u64,
    pub syncs: u64,
    pub truncates: u64,
    /// Syncs failed once after the fault ended.
    pub reported_after: u64,
}

/// A directory's fault, registered while this lives. Files opened under the directory
/// before it was registered are not affected.
pub struct Faults {
    dir: PathBuf,
    fault: Arc<Fault>,
}

impl Faults {
    /// Registers the VFS (once per process) and a fault, off, for files under `dir`.
    pub fn register(dir: &Path) -> Faults {
        vfs();
        let dir = dir.canonicalize().expect("the fault's directory exists");
        let fault = Arc::new(Fault::default());
        registry()
            .lock()
            .unwrap()
            .push((dir.clone(), fault.clone()));
        Faults { dir, fault }
    }

    pub fn start(&self) {
        self.fault.report_after.store(false, Ordering::SeqCst);
        self.fault.on.store(true, Ordering::SeqCst);
    }

    pub fn stop(&self) {
        self.fault.on.store(false, Ordering::SeqCst);
        self.fault.report_after.store(true, Ordering::SeqCst);
    }

    pub fn failed(&self) -> Failed {
        let f = &self.fault;
        Failed {
            writes: f.failed_writes.load(Ordering::SeqCst),
            syncs: f.failed_syncs.load(Ordering::SeqCst),
            truncates: f.failed_truncates.load(Ordering::SeqCst),
            reported_after: f.reported_after.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        self.fault.on.store(false, Ordering::SeqCst);
        self.fault.report_after.store(false, Ordering::SeqCst);
        registry()
            .lock()
            .unwrap()
            .retain(|(d, f)| !(d == &self.dir && Arc::ptr_eq(f, &self.fault)));
    }
}

/// Each registered directory with its fault.
type Registry = Mutex<Vec<(PathBuf, Arc<Fault>)>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn fault_for(name: &Path) -> Option<Arc<Fault>> {
    registry()
        .lock()
        .unwrap()
        .iter()
        .find(|(dir, _)| name.starts_with(dir))
        .map(|(_, f)| f.clone())
}

/// The default VFS this one forwards to.
struct Vfs {
    real: *mut ffi::sqlite3_vfs,
}

// SAFETY: it points at SQLite's default VFS, which lives for the rest of the process and
// which SQLite calls from any thread.
unsafe impl Send for Vfs {}
unsafe impl Sync for Vfs {}

fn vfs() -> &'static Vfs {
    static VFS: OnceLock<Vfs> = OnceLock::new();
    VFS.get_or_init(|| {
        // SAFETY: initialising SQLite and finding its default VFS have no preconditions;
        // the copy made of it is registered once and never freed, as SQLite requires of a
        // registered VFS.
        unsafe {
            assert_eq!(ffi::sqlite3_initialize(), ffi::SQLITE_OK);
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!real.is_null(), "SQLite has a default VFS");
            let mut ours = std::ptr::read(real);
            ours.zName = NAME_C.as_ptr();
            ours.pNext = std::ptr::null_mut();
            ours.pAppData = std::ptr::null_mut();
            ours.szOsFile = (HEADER + (*real).szOsFile as usize) as c_int;
            ours.xOpen = Some(open);
            let ours = Box::into_raw(Box::new(ours));
            assert_eq!(ffi::sqlite3_vfs_register(ours, 0), ffi::SQLITE_OK);
            Vfs { real }
        }
    })
}

/// Our file: SQLite's base (our method table), the directory's fault if any, and the
/// default VFS's file, which follows at [`HEADER`] bytes.
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    fault: *const Fault,
    real: *mut ffi::sqlite3_file,
}

/// Our file's size rounded up so that the default VFS's file after it is aligned for any
/// field it has.
const HEADER: usize = std::mem::size_of::<File>().next_multiple_of(16);

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let v = vfs();
    let f = file.cast::<File>();
    // SAFETY: SQLite gives `szOsFile` bytes at `file`, which is HEADER bytes for our
    // `File` and then the default VFS's whole file.
    unsafe {
        let real = file.cast::<u8>().add(HEADER).cast::<ffi::sqlite3_file>();
        (*real).pMethods = std::ptr::null();
        let rc = ((*v.real).xOpen.unwrap())(v.real, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if !(*real).pMethods.is_null() {
                ((*(*real).pMethods).xClose.unwrap())(real);
            }
            (*f).base.pMethods = std::ptr::null();
            return rc;
        }
        let fault = if name.is_null() {
            None
        } else {
            let name = CStr::from_ptr(name).to_string_lossy();
            fault_for(Path::new(&*name))
        };
        (*f).fault = fault.map_or(std::ptr::null(), Arc::into_raw);
        (*f).real = real;
        (*f).base.pMethods = &METHODS;
        rc
    }
}

/// The default VFS's file behind ours.
///
/// # Safety
/// `file` must be a file this VFS opened and has not closed.
unsafe fn real(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (*file.cast::<File>()).real }
}

/// The default VFS's method table for `file`.
///
/// # Safety
/// As for [`real`].
unsafe fn methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*real(file)).pMethods }
}

/// The fault of the directory `file` lives under, if one was registered when it opened.
///
/// # Safety
/// As for [`real`].
unsafe fn fault(file: *mut ffi::sqlite3_file) -> Option<&'static Fault> {
    // SAFETY: the pointer is an `Arc` that `close` releases, after the last call that
    // can reach here for this file.
    unsafe { (*file.cast::<File>()).fault.as_ref() }
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: Some(shm_map),
    xShmLock: Some(shm_lock),
    xShmBarrier: Some(shm_barrier),
    xShmUnmap: Some(shm_unmap),
    xFetch: Some(fetch),
    xUnfetch: Some(unfetch),
};

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let rc = (methods(file).xClose.unwrap())(real(file));
        let f = file.cast::<File>();
        if !(*f).fault.is_null() {
            drop(Arc::from_raw((*f).fault));
            (*f).fault = std::ptr::null();
        }
        rc
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    unsafe { (methods(file).xRead.unwrap())(real(file), buf, n, off) }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        if let Some(f) = fault(file)
            && f.on.load(Ordering::SeqCst)
            && (f.writes.fetch_add(1, Ordering::SeqCst) / WRITE_RUN) % 2 == 1
        {
            f.failed_writes.fetch_add(1, Ordering::SeqCst);
            return ffi::SQLITE_IOERR_WRITE;
        }
        (methods(file).xWrite.unwrap())(real(file), buf, n, off)
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe {
        if let Some(f) = fault(file)
            && f.on.load(Ordering::SeqCst)
        {
            f.failed_truncates.fetch_add(1, Ordering::SeqCst);
            return ffi::SQLITE_IOERR_TRUNCATE;
        }
        (methods(file).xTruncate.unwrap())(real(file), size)
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        if let Some(f) = fault(file) {
            if f.on.load(Ordering::SeqCst) {
                f.failed_syncs.fetch_add(1, Ordering::SeqCst);
                return ffi::SQLITE_IOERR_FSYNC;
            }
            if f.report_after.swap(false, Ordering::SeqCst) {
                f.reported_after.fetch_add(1, Ordering::SeqCst);
                return ffi::SQLITE_IOERR_FSYNC;
            }
        }
        (methods(file).xSync.unwrap())(real(file), flags)
    }
}

unsafe extern "C" fn file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    unsafe { (methods(file).xFileSize.unwrap())(real(file), size) }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { (methods(file).xLock.unwrap())(real(file), level) }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe { (methods(file).xUnlock.unwrap())(real(file), level) }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe { (methods(file).xCheckReservedLock.unwrap())(real(file), out) }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe { (methods(file).xFileControl.unwrap())(real(file), op, arg) }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { (methods(file).xSectorSize.unwrap())(real(file)) }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe { (methods(file).xDeviceCharacteristics.unwrap())(real(file)) }
}

unsafe extern "C" fn shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe { (methods(file).xShmMap.unwrap())(real(file), region, size, extend, out) }
}

unsafe extern "C" fn shm_lock(
    file: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe { (methods(file).xShmLock.unwrap())(real(file), off, n, flags) }
}

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    unsafe { (methods(file).xShmBarrier.unwrap())(real(file)) }
}

unsafe extern "C" fn shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe { (methods(file).xShmUnmap.unwrap())(real(file), delete) }
}

unsafe extern "C" fn fetch(
    file: *mut ffi::sqlite3_file,
    off: ffi::sqlite3_int64,
    n: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe { (methods(file).xFetch.unwrap())(real(file), off, n, out) }
}

unsafe extern "C" fn unfetch(
    file: *mut ffi::sqlite3_file,
    off: ffi::sqlite3_int64,
    p: *mut c_void,
) -> c_int {
    unsafe { (methods(file).xUnfetch.unwrap())(real(file), off, p) }
}
