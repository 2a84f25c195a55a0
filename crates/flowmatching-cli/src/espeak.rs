//! Speech synthesis with libespeak-ng, opened at run time (Debian: `apt-get install espeak-ng`), with
//! the synthesiser's phone events: each phone's name and the sample at which it starts.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};

use anyhow::{bail, Context, Result};
use libloading::{Library, Symbol};

/// The library's file name (the runtime package's soname).
const LIBRARY: &str = "libespeak-ng.so.1";

/// `AUDIO_OUTPUT_SYNCHRONOUS`: the callback receives the audio, synthesis returns when done.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_PHONEME_EVENTS | espeakINITIALIZE_DONT_EXIT`.
const INIT_OPTIONS: c_int = 0x0001 | 0x8000;
const EVENT_LIST_TERMINATED: c_int = 0;
const EVENT_PHONEME: c_int = 7;
const CHARS_UTF8: c_uint = 1;
const POS_CHARACTER: c_int = 1;
const PARAM_RATE: c_int = 1;
const PARAM_PITCH: c_int = 3;

/// `espeak_EVENT` (speak_lib.h, API revision 12): 40 bytes on 64-bit Linux.
#[repr(C)]
struct Event {
    kind: c_int,
    unique_identifier: c_uint,
    text_position: c_int,
    length: c_int,
    audio_position: c_int,
    sample: c_int,
    user_data: *mut c_void,
    /// The phone name for phoneme events (up to 8 bytes, zero-terminated when shorter).
    id: [u8; 8],
}

type Callback = extern "C" fn(*mut i16, c_int, *mut Event) -> c_int;

/// What the callback gathers during one synthesis (the synthesis is synchronous, on this thread).
#[derive(Default)]
struct Gathered {
    samples: Vec<i16>,
    phones: Vec<(usize, String)>,
}

thread_local! {
    static GATHERED: RefCell<Gathered> = RefCell::new(Gathered::default());
}

extern "C" fn gather(wav: *mut i16, n: c_int, events: *mut Event) -> c_int {
    GATHERED.with(|g| {
        let mut g = g.borrow_mut();
        if !wav.is_null() && n > 0 {
            // SAFETY: espeak-ng passes `n` valid samples at `wav` for the duration of the call.
            let s = unsafe { std::slice::from_raw_parts(wav, n as usize) };
            g.samples.extend_from_slice(s);
        }
        let mut e = events;
        // SAFETY: the event list is terminated by an event of type LIST_TERMINATED.
        unsafe {
            while !e.is_null() && (*e).kind != EVENT_LIST_TERMINATED {
                if (*e).kind == EVENT_PHONEME {
                    let raw = (*e).id;
                    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                    let name = String::from_utf8_lossy(&raw[..end]).into_owned();
                    g.phones.push(((*e).sample.max(0) as usize, name));
                }
                e = e.add(1);
            }
        }
    });
    0
}

/// One synthesised utterance: 16-bit samples as f32 in [-1, 1) and (start sample, phone name) pairs.
pub struct Synthesis {
    pub samples: Vec<f32>,
    pub phones: Vec<(usize, String)>,
}

/// The loaded synthesiser.
pub struct Espeak {
    lib: Library,
    pub sample_rate: u32,
}

impl Espeak {
    /// Opens libespeak-ng and initialises it for synchronous synthesis with phone events.
    pub fn open() -> Result<Self> {
        // SAFETY: loading libespeak-ng runs its (trivial) library constructors.
        let lib = unsafe { Library::new(LIBRARY) }.with_context(|| {
            format!(
                "cannot open {LIBRARY}: speech synthesis needs espeak-ng (Debian: apt-get install \
                 espeak-ng)"
            )
        })?;
        let rate = {
            // SAFETY: the signatures are those of speak_lib.h.
            let init: Symbol<unsafe extern "C" fn(c_int, c_int, *const c_char, c_int) -> c_int> =
                unsafe { lib.get(b"espeak_Initialize\0")? };
            let set_cb: Symbol<unsafe extern "C" fn(Callback)> =
                unsafe { lib.get(b"espeak_SetSynthCallback\0")? };
            // SAFETY: NULL path means espeak-ng's installed data; the callback lives for the program.
            let rate = unsafe {
                init(
                    AUDIO_OUTPUT_SYNCHRONOUS,
                    500,
                    std::ptr::null(),
                    INIT_OPTIONS,
                )
            };
            unsafe { set_cb(gather) };
            rate
        };
        if rate <= 0 {
            bail!("espeak-ng failed to initialise (is its data, espeak-ng-data, installed?)");
        }
        Ok(Self {
            lib,
            sample_rate: rate as u32,
        })
    }

    /// Speaks `text` with `voice` (an espeak-ng voice name such as "en+f3") at `rate` words per minute
    /// and `pitch` (0-100).
    pub fn speak(&self, text: &str, voice: &str, rate: u32, pitch: u32) -> Result<Synthesis> {
        let c_voice = CString::new(voice).context("a voice name holds a zero byte")?;
        let c_text = CString::new(text).context("a sentence holds a zero byte")?;
        // SAFETY: the signatures are those of speak_lib.h; the strings outlive the calls.
        unsafe {
            let set_voice: Symbol<unsafe extern "C" fn(*const c_char) -> c_int> =
                self.lib.get(b"espeak_SetVoiceByName\0")?;
            let set_param: Symbol<unsafe extern "C" fn(c_int, c_int, c_int) -> c_int> =
                self.lib.get(b"espeak_SetParameter\0")?;
            #[allow(clippy::type_complexity)]
            let synth: Symbol<
                unsafe extern "C" fn(
                    *const c_void,
                    usize,
                    c_uint,
                    c_int,
                    c_uint,
                    c_uint,
                    *mut c_uint,
                    *mut c_void,
                ) -> c_int,
            > = self.lib.get(b"espeak_Synth\0")?;
            let sync: Symbol<unsafe extern "C" fn() -> c_int> =
                self.lib.get(b"espeak_Synchronize\0")?;
            if set_voice(c_voice.as_ptr()) != 0 {
                bail!("espeak-ng has no voice '{voice}'");
            }
            set_param(PARAM_RATE, rate as c_int, 0);
            set_param(PARAM_PITCH, pitch as c_int, 0);
            GATHERED.with(|g| *g.borrow_mut() = Gathered::default());
            let bytes = c_text.as_bytes_with_nul();
            let rc = synth(
                bytes.as_ptr() as *const c_void,
                bytes.len(),
                0,
                POS_CHARACTER,
                0,
                CHARS_UTF8,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            sync();
            if rc != 0 {
                bail!("espeak-ng could not speak {text:?} (error {rc})");
            }
        }
        let g = GATHERED.with(|g| std::mem::take(&mut *g.borrow_mut()));
        if g.samples.is_empty() {
            bail!("espeak-ng produced no audio for {text:?}");
        }
        Ok(Synthesis {
            samples: g.samples.iter().map(|&s| s as f32 / 32768.0).collect(),
            phones: g.phones,
        })
    }
}

/// The library's version string, for reports.
pub fn version(e: &Espeak) -> String {
    // SAFETY: espeak_Info returns a static string; the path out-parameter may be NULL.
    unsafe {
        let info: std::result::Result<
            Symbol<unsafe extern "C" fn(*mut *const c_char) -> *const c_char>,
            _,
        > = e.lib.get(b"espeak_Info\0");
        match info {
            Ok(f) => {
                let p = f(std::ptr::null_mut());
                if p.is_null() {
                    "unknown".into()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            }
            Err(_) => "unknown".into(),
        }
    }
}
