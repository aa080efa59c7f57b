//! The thread-task plumbing: a [`Call`] is posted to an nginx thread pool in
//! a [`TaskBox`] ([`post`]), run there by [`run_call`], and handed back to
//! the completion handler the poster chose, on the worker's event loop
//! ([`finish`]).

use ngx::ffi::{ngx_event_t, ngx_thread_pool_t, ngx_thread_task_post, ngx_thread_task_t, NGX_OK};

use super::redis_io::{run_call, Call};

/// The task and its call in one allocation, freed by the completion handler.
#[repr(C)]
struct TaskBox {
    task: ngx_thread_task_t,
    call: Call,
}

/// Posts `call` to `pool`; nginx runs `done` on the worker's event loop when
/// the pool is done with it, and `done` takes the call back with [`finish`].
/// False when the pool refused the task.
pub(super) fn post(
    call: Call,
    pool: *mut ngx_thread_pool_t,
    done: unsafe extern "C" fn(*mut ngx_event_t),
) -> bool {
    // SAFETY: an all-zero ngx_thread_task_t is what ngx_thread_task_alloc
    // returns (it pcallocs); nginx fills `id` and the event's state on post.
    let mut task: ngx_thread_task_t = unsafe { std::mem::zeroed() };
    task.handler = Some(run_call);
    task.event.handler = Some(done);
    let b = Box::into_raw(Box::new(TaskBox { task, call }));
    // SAFETY: `b` is a fresh, uniquely owned allocation; it stays alive until
    // `done` (through `finish`) or the error branch below frees it.
    unsafe {
        (*b).task.ctx = (&raw mut (*b).call).cast();
        (*b).task.event.data = b.cast();
        if ngx_thread_task_post(pool, &raw mut (*b).task) != NGX_OK as isize {
            drop(Box::from_raw(b));
            return false;
        }
    }
    true
}

/// Takes the call back out of a completed task, freeing the task.
///
/// # Safety
/// `ev` must be the completion event of a task made by [`post`], and this is
/// called once for it, from the completion handler.
pub(super) unsafe fn finish(ev: *mut ngx_event_t) -> Call {
    // SAFETY: `data` is the TaskBox made by `post`; the pool is done with it.
    let b = unsafe { Box::from_raw((*ev).data.cast::<TaskBox>()) };
    b.call
}
